"""spectral's OpenAPI rules (``spectral:oas``, through ``.spectral.yaml``) find nothing in
openapi/openapi.json: no error and no warning.

spectral is an npm package: it is installed once, pinned, into a cache folder that later runs
reuse (about 25 s the first time, then about 5 s a run). Without npm the test skips, except
in CI (``CI=true``), where .ci/run installs node and npm and it must run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.server import ROOT

VERSION = "6.16.3"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gradsvc-spectral"


def _spectral() -> Path:
    npm = shutil.which("npm")
    if npm is None:
        if os.environ.get("CI") == "true":
            pytest.fail("npm is missing: .ci/run installs nodejs and npm from Debian")
        pytest.skip("needs npm (apt-get install -y nodejs npm)")
    tool = CACHE / VERSION / "node_modules" / ".bin" / "spectral"
    if not tool.exists():
        install = [npm, "install", "--prefix", str(tool.parents[2]), "--no-audit", "--no-fund"]
        run = subprocess.run(
            [*install, f"@stoplight/spectral-cli@{VERSION}"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stdout + run.stderr
    return tool


def test_spectral_finds_nothing_in_the_document() -> None:
    lint = [str(_spectral()), "lint", "openapi/openapi.json", "--ruleset", ".spectral.yaml"]
    run = subprocess.run(
        [*lint, "--format", "text", "--fail-severity", "hint"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    printed = run.stdout + run.stderr
    # One line per finding ("file:line:col severity rule message"), none wanted.
    findings = re.findall(r"^\S+:\d+:\d+ (error|warning|information|hint) ", printed, re.M)
    assert run.returncode == 0 and findings == [], printed
