"""Command-line flags from a training config dataclass: one `--flag` per field."""

from __future__ import annotations

import argparse
from dataclasses import asdict


def add_config_flags(parser: argparse.ArgumentParser, defaults) -> None:
    for name, value in asdict(defaults).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)


def config_from(args: argparse.Namespace, cls):
    return cls(**{k: getattr(args, k) for k in asdict(cls())})


def resolve_device(name: str) -> "torch.device":  # noqa: F821
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)
