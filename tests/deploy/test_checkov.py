"""checkov over deploy/k8s (each kustomization as kustomize renders it) and both Dockerfiles:
no failed check. A check that does not apply is skipped where it is, with its reason written
next to it (a ``checkov.io/skip`` annotation, a ``# checkov:skip=`` comment)."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest

from tests.deploy.tools import K8S, ROOT, tool

CHECKOV_VENV = ROOT / ".venv-checkov" / "bin"


def _checkov(*args: str) -> list[dict[str, Any]]:
    exe = tool("checkov", where=CHECKOV_VENV, install="`make test` makes .venv-checkov")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BC_", "CKV_", "PRISMA_"))}
    result = subprocess.run(
        # --skip-download: no policy download (no network); the built-in checks run.
        [exe, *args, "--output", "json", "--compact", "--skip-download"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.stdout.strip(), result.stderr
    loaded = json.loads(result.stdout)
    reports = loaded if isinstance(loaded, list) else [loaded]
    return reports


@pytest.mark.parametrize(
    "args",
    [
        ["--directory", str(K8S), "--framework", "kustomize"],
        ["--file", "Dockerfile", "--file", "Dockerfile.gpu", "--framework", "dockerfile"],
    ],
    ids=["k8s", "dockerfiles"],
)
def test_checkov_finds_nothing(args: list[str]) -> None:
    reports = _checkov(*args)
    summary = {key: sum(r["summary"][key] for r in reports) for key in ("passed", "failed")}
    failed = [
        f"{c['check_id']} {c['resource']} ({c['file_path']}): {c['check_name']}"
        for r in reports
        for c in r["results"]["failed_checks"]
    ]
    assert not failed, "\n".join(failed)
    assert summary["passed"] > 0, reports
    for report in reports:
        for skipped in report["results"]["skipped_checks"]:
            comment = (skipped.get("check_result") or {}).get("suppress_comment", "")
            assert len(comment.strip()) > 20, f"{skipped['check_id']}: skipped without a reason"
