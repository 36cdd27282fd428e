"""The `model` package loads its names on first use: errors and configs without torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

import model
from tests.conftest import ROOT


def test_errors_and_configs_import_without_torch():
    code = ("import sys, model.errors, model.config\n"
            "assert 'torch' not in sys.modules\n"
            "from model import ATokenError, get_variant\n"
            "assert 'torch' not in sys.modules\n"
            "assert get_variant('tiny').latent_channels > 0\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]


def test_every_public_name_resolves():
    for name in model.__all__:
        assert getattr(model, name) is not None
    assert set(model.__all__) <= set(dir(model))
    with pytest.raises(AttributeError):
        model.NoSuchThing  # noqa: B018
