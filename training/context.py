"""A linear decoder that reads a token's 8 neighbours: the PCA code, decoded with context.

PCA is the best *per-patch* linear code, but a patch's discarded detail is partly predictable
from the codes around it (edges run across patch borders). Least squares on training crops
gives that prediction: residual of a patch ~ sum over the 3x3 neighbourhood of (coefficients @
W_offset) + bias, with replicated borders. On the held-out pictures it is worth about a
quarter of a dB over PCA at the same 48 values per token. `warm_start.py` builds it into the
decoder: one attention head per neighbour fetches that token's coefficients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import ImageCrops, training_images
from .pca import PATCH, TokenPCA, from_patches, to_patches, to_uint8, to_unit

# (row, column) offsets in token units, centre excluded; the model's coords are (x=row, y=column).
OFFSETS = tuple((dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0))


@dataclass
class ContextDecoder:
    centre: np.ndarray  # [L, 768] added to the PCA basis for the token's own coefficients
    neighbours: np.ndarray  # [8, L, 768] one map per entry of OFFSETS
    bias: np.ndarray  # [768]
    directions: np.ndarray  # [r, 768] orthonormal: the span the neighbour terms are written in
    scales: np.ndarray  # [r] std of the neighbour terms along each direction

    def reconstruct(self, pca: TokenPCA, image: np.ndarray) -> np.ndarray:
        """uint8 [H, W, 3] -> PCA code decoded with context (the neighbour terms in their
        `rank` directions, as the warm-started model carries them), uint8 [H, W, 3]."""
        x = to_unit(image)
        coeffs, rows = coefficient_grid(pca, x)
        latent = coeffs.shape[-1]
        near = neighbourhood(coeffs)
        context = near[:, latent:] @ self.neighbours.reshape(-1, self.neighbours.shape[-1])
        context = context @ self.directions.T @ self.directions
        flat = coeffs.reshape(len(rows), -1)
        out = flat @ (pca.basis + self.centre) + pca.mean + self.bias + context
        return to_uint8(from_patches(out, x[None].shape, 1)[0])


def neighbourhood(coeffs: np.ndarray) -> np.ndarray:
    """[rows, cols, L] coefficient grid -> [rows*cols, 9*L]: the centre, then OFFSETS, edges replicated."""
    rows, cols, _ = coeffs.shape
    padded = np.pad(coeffs, ((1, 1), (1, 1), (0, 0)), mode="edge")
    parts = [coeffs] + [padded[1 + dr:1 + dr + rows, 1 + dc:1 + dc + cols] for dr, dc in OFFSETS]
    return np.concatenate(parts, -1).reshape(rows * cols, -1)


def coefficient_grid(pca: TokenPCA, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float [H, W, 3] in [-1, 1] -> (coefficients [H/16, W/16, L], patch rows [H/16*W/16, 768])."""
    rows = to_patches(image[None], 1)
    coeffs = pca.coefficients(rows)
    return coeffs.reshape(image.shape[0] // PATCH, image.shape[1] // PATCH, -1), rows


def fit_context_decoder(pca: TokenPCA, crops: int = 300, size: int = 256, ridge: float = 1e-2,
                        rank: int = 192, seed: int = 1) -> ContextDecoder:
    """Least squares of each patch's PCA residual on its neighbourhood's coefficients."""
    feats, targets = [], []
    for crop in ImageCrops(training_images(), size, seed).sample(crops).numpy():
        coeffs, rows = coefficient_grid(pca, crop)
        feats.append(neighbourhood(coeffs))
        targets.append(rows - (coeffs.reshape(len(rows), -1) @ pca.basis + pca.mean))
    x, y = np.concatenate(feats), np.concatenate(targets)  # [n, 9L], [n, 768]
    x1 = np.concatenate([x, np.ones((len(x), 1), x.dtype)], 1)
    w = np.linalg.solve(x1.T @ x1 + ridge * np.eye(x1.shape[1]), x1.T @ y)  # [9L + 1, 768]
    latent = pca.basis.shape[0]
    maps = w[:-1].reshape(9, latent, -1)
    # The neighbour terms travel through `rank` residual channels: keep their principal span.
    context = x[:, latent:] @ w[latent:-1]  # [n, 768]
    _, sv, vt = np.linalg.svd(context - context.mean(0), full_matrices=False)
    return ContextDecoder(centre=maps[0], neighbours=maps[1:], bias=w[-1], directions=vt[:rank],
                          scales=sv[:rank] / np.sqrt(len(x)))
