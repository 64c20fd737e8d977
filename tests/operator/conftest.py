"""A real API server for the modules that need one, started once per test session."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
K8S = Path(os.environ.get("FEDSILO_K8S_DIR", ROOT.parent / "shared" / "k8s"))


@pytest.fixture(scope="session")
def kubeconfig() -> Iterator[str]:
    """A real API server: FEDSILO_TEST_KUBECONFIG, else ../shared/k8s started (and stopped) here.

    Session-scoped: every module that asks for it shares one start (~15 s); each module keeps
    to its own namespaces and Helm releases.
    """
    given = os.environ.get("FEDSILO_TEST_KUBECONFIG")
    if given:
        yield given
        return
    start = K8S / "start-cluster.sh"
    if not start.exists():
        pytest.skip(f"no real control plane: {start} absent and FEDSILO_TEST_KUBECONFIG unset")
    result = subprocess.run(
        ["bash", str(start), "--with-kcm"], capture_output=True, text=True, timeout=180, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"start-cluster.sh failed:\n{result.stderr[-3000:]}")
    try:
        yield result.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(K8S / "stop-cluster.sh")], capture_output=True, timeout=120, check=False)
