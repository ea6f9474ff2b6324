"""The base install (no extras) is the offline stage: it indexes and shards without torch.

A fresh venv gets a non-editable install of a copy of pipeline/ + pyproject.toml + README.md,
so the test never writes into the checkout and cannot see the trainer or its dependencies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PIP_TIMEOUT_S = 300
# what the base install must bring: the build backend and the dependencies of pipeline/
BASE_REQUIREMENTS = ["setuptools>=68", "numpy", "soundfile", "soxr", "tqdm"]


def _env() -> dict[str, str]:
    """The caller's environment without anything that would leak its packages into the venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def _run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


def _index_reachable(python: Path, work: Path) -> bool:
    """Whether pip can fetch the base requirements from any index or wheel folder."""
    download = [str(python), "-m", "pip", "download", "-q", "--no-deps", "-d", str(work / "probe")]
    probe = _run([*download, *BASE_REQUIREMENTS], cwd=work, timeout=PIP_TIMEOUT_S)
    return probe.returncode == 0


def test_base_install_indexes_and_shards_without_torch(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copytree(
        REPO / "pipeline", src / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(env_dir)
    python = env_dir / "bin" / "python"
    work = tmp_path / "work"
    work.mkdir()

    install = _run(
        [str(python), "-m", "pip", "install", "-q", "--no-compile", str(src)],
        cwd=work,
        timeout=PIP_TIMEOUT_S,
    )
    if install.returncode != 0:
        if not _index_reachable(python, work):
            pytest.skip("pip cannot reach any package index (no network): base install untested")
        pytest.fail(f"pip install of the base package failed:\n{install.stdout}\n{install.stderr}")

    no_torch = _run([str(python), "-c", "import torch"], cwd=work)
    assert no_torch.returncode != 0, "the base install brought torch"
    assert "No module named 'torch'" in no_torch.stderr

    steps = [
        ["synth", "audio", "--tracks", "2", "--seconds", "1", "--sample-rate", "16000"],
        ["index", "audio", "--out", "set/index.json", "--jobs", "1", "--quiet"],
        ["shard", "set/index.json", "--chunk-frames", "4096", "--jobs", "1", "--quiet"],
    ]
    for step in steps:
        done = _run([str(python), "-m", "pipeline", *step], cwd=work)
        assert done.returncode == 0, f"pipeline {step[0]} failed:\n{done.stdout}\n{done.stderr}"

    where = _run([str(python), "-c", "import pipeline; print(pipeline.__file__)"], cwd=work)
    assert Path(where.stdout.strip()).is_relative_to(env_dir), "ran the checkout, not the install"
    manifest = json.loads((work / "set" / "manifest.json").read_text())
    assert sum(len(shards) for shards in manifest["shards"].values()) >= 1
