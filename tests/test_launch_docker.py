"""The Dockerfile: hadolint-clean, and its version pins agree with setup.py, the requirements
files and the launcher environment script (no Docker engine is needed for either check)."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


@pytest.fixture(scope="module")
def hadolint() -> str:
    subprocess.run(["bash", str(REPO / "scripts" / "setup_launch_env.sh")], check=True)
    return str(REPO / ".venv-launch" / "bin" / "hadolint")


def _lint(hadolint: str, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint, "--no-color", "--config", str(REPO / ".hadolint.yaml"),
                           str(path)], capture_output=True, text=True, timeout=60)


def test_dockerfile_passes_hadolint(hadolint):
    out = _lint(hadolint, DOCKERFILE)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_config_rejects_a_careless_dockerfile(hadolint, tmp_path):
    # The same config must fail unpinned images and packages, or the check above proves nothing.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN pip install requests\n")
    out = _lint(hadolint, bad)
    assert out.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3026"):
        assert rule in out.stdout


def _args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", DOCKERFILE.read_text(), flags=re.M))


def _setup_requirements() -> tuple[list[Requirement], dict[str, list[Requirement]]]:
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call)
                and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords
          if k.arg in ("install_requires", "extras_require")}
    return ([Requirement(r) for r in kw["install_requires"]],
            {name: [Requirement(r) for r in reqs] for name, reqs in kw["extras_require"].items()})


def _find(reqs: list[Requirement], name: str) -> Requirement:
    return next(r for r in reqs if r.name == name)


def _requirements_file(name: str) -> list[Requirement]:
    lines = (REPO / "requirements" / name).read_text().splitlines()
    return [Requirement(l.split("#")[0]) for l in lines if l.split("#")[0].strip()]


def test_megatron_core_pin_is_inside_the_tested_range():
    core, _ = _setup_requirements()
    pinned = Version(_args()["MEGATRON_CORE_VERSION"])
    assert pinned in _find(core, "megatron-core").specifier
    assert pinned in _find(_requirements_file("core.txt"), "megatron-core").specifier


def test_launcher_and_rollout_pins_agree_everywhere():
    args = _args()
    _, extras = _setup_requirements()
    # The launcher environment installs requirements/lock-launch.txt (scripts/setup_launch_env.sh).
    assert "requirements/lock-launch.txt" in (REPO / "scripts" / "setup_launch_env.sh").read_text()
    launch_lock = _requirements_file("lock-launch.txt")
    for pkg, arg in (("nemo-run", "NEMO_RUN_VERSION"), ("leptonai", "LEPTONAI_VERSION")):
        assert str(_find(extras["launch"], pkg).specifier) == f"=={args[arg]}"
        assert str(_find(launch_lock, pkg).specifier) == f"=={args[arg]}"
        assert str(_find(_requirements_file("launch.txt"), pkg).specifier) == f"=={args[arg]}"
    assert str(_find(extras["gpu-rollout"], "vllm").specifier) == f"=={args['VLLM_VERSION']}"


def test_base_image_is_pinned_and_its_torch_series_matches_the_torch_pin():
    text = DOCKERFILE.read_text()
    base = re.search(r"^FROM (\S+)", text, flags=re.M).group(1)
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3", base), base
    series = re.search(r"torch\.__version__\.startswith\('(\d+\.\d+)'\)", text).group(1)
    core, _ = _setup_requirements()
    torch_pin = Version(str(_find(core, "torch").specifier).removeprefix("=="))
    assert f"{torch_pin.major}.{torch_pin.minor}" == series
