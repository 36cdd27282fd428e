"""3D Gaussian Splatting PLY files: the layout common splat viewers open (x, y, z, normals,
f_dc_0..2, opacity as a logit, scale_0..2 as logs, rot_0..3 as a wxyz quaternion)."""

from __future__ import annotations

import numpy as np

from .errors import CorruptMediaError

FIELDS = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
          "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]


def gaussians_to_ply(xyz: np.ndarray, features_dc: np.ndarray, opacity: np.ndarray, scale: np.ndarray,
                     rotation: np.ndarray) -> bytes:
    """Activated values in: xyz [M, 3], features_dc [M, 3] (SH DC), opacity [M] in (0, 1),
    scale [M, 3] standard deviations, rotation [M, 4] unit wxyz. Stored as the viewers expect."""
    m = xyz.shape[0]
    opacity = np.clip(opacity.reshape(m).astype(np.float64), 1e-6, 1 - 1e-6)
    table = np.zeros((m, len(FIELDS)), np.float32)
    table[:, 0:3] = xyz
    table[:, 6:9] = features_dc.reshape(m, 3)
    table[:, 9] = np.log(opacity / (1 - opacity))
    table[:, 10:13] = np.log(np.maximum(scale, 1e-12))
    table[:, 13:17] = rotation
    header = "ply\nformat binary_little_endian 1.0\nelement vertex %d\n" % m
    header += "".join(f"property float {name}\n" for name in FIELDS) + "end_header\n"
    return header.encode("ascii") + table.astype("<f4").tobytes()


def ply_to_gaussians(data: bytes) -> dict[str, np.ndarray]:
    """Read a binary little-endian Gaussian PLY; returns activated values (inverse of the writer)."""
    end = data.find(b"end_header\n")
    if not data.startswith(b"ply") or end < 0:
        raise CorruptMediaError("not a PLY file")
    lines = data[:end].decode("ascii", errors="replace").splitlines()
    if "format binary_little_endian 1.0" not in lines:
        raise CorruptMediaError("only binary little-endian Gaussian PLY files are supported")
    count = next((int(ln.split()[2]) for ln in lines if ln.startswith("element vertex")), None)
    props = [ln.split()[2] for ln in lines if ln.startswith("property float")]
    missing = [f for f in FIELDS if f not in props and not f.startswith("n")]
    if count is None or missing:
        raise CorruptMediaError(f"not a Gaussian PLY (missing {missing or 'vertex count'})")
    body = np.frombuffer(data[end + len("end_header\n"):], dtype="<f4")
    if body.size < count * len(props):
        raise CorruptMediaError("PLY body is truncated")
    table = body[: count * len(props)].reshape(count, len(props))
    col = {name: table[:, i] for i, name in enumerate(props)}
    stack = lambda names: np.stack([col[n] for n in names], 1)  # noqa: E731
    return {
        "xyz": stack(["x", "y", "z"]),
        "features_dc": stack(["f_dc_0", "f_dc_1", "f_dc_2"]),
        "opacity": 1 / (1 + np.exp(-col["opacity"].astype(np.float64))),
        "scale": np.exp(stack(["scale_0", "scale_1", "scale_2"])),
        "rotation": stack(["rot_0", "rot_1", "rot_2", "rot_3"]),
    }
