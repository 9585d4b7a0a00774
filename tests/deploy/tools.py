"""Finding the command-line tools the deployment tests run: missing is a skip on a laptop and a
failure in CI (.ci/run and `make test` install them)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
# What `kubectl apply -k` is pointed at: both overlays, and the example of an operator's own.
OVERLAYS = ("overlays/cpu", "overlays/gpu", "examples/gpu-external-redis")


def tool(name: str, *, where: Path | None = None, install: str) -> str:
    """The path of ``name``: next to this Python or in ``where`` first, then on PATH."""
    for folder in (Path(sys.executable).parent, where):
        if folder is not None and (found := shutil.which(name, path=str(folder))):
            return found
    if found := shutil.which(name):
        return found
    reason = f"{name} not found: {install}"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)
