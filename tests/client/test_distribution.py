"""``pip install ./client`` alone: a fresh venv with the client and nothing of the server's,
in which the notebook's two session steps and ``gradsvc-train`` run against a live server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.e2e.server import ROOT, Server

SERVER_ONLY = ("torch", "fastapi", "uvicorn", "redis", "service", "pydantic")

NOTEBOOK = """
import importlib.util, subprocess, sys
from pathlib import Path

for name in {server_only!r}:
    assert importlib.util.find_spec(name) is None, name + " is installed"

from gradsvc_client import SGD, Client, Expression, SquaredLoss, Value

try:
    Client({url!r})
except ImportError as exc:
    assert "pip install 'gradsvc-client[torch]'" in str(exc), exc
else:
    raise AssertionError("tensors='torch' without torch was not refused at construction")

model = Expression("w * x + 1", params={{"w": Value([1.0])}}, dtype="float64")
with Client({url!r}, tensors="numpy") as gs:
    s = gs.create_session(model, SquaredLoss(), SGD(lr=0.1))
    one, two = gs.session_step(s, x=1, y=3), gs.session_step(s, x=2, y=5)
    assert (one.loss, one.params["w"].tolist(), one.outputs.tolist()) == (0.5, [1.1], 2.0)
    assert (two.loss, two.params["w"].tolist()) == (1.6199999999999997, [1.46])
    assert two.outputs.tolist() == 3.2 and type(two.outputs).__module__ == "numpy"

    data = Path("line.csv")
    data.write_text("x,y\\n" + "".join(f"{{x}},{{2 * x + 1}}\\n" for x in range(4)))
    train = Path(sys.executable).with_name("gradsvc-train")
    done = subprocess.run(
        [str(train), "--server", {url!r}, "--session", s.id, str(data), "--epochs", "2",
         "--batch-size", "2"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "4 steps, session at step 6" in done.stdout, done.stdout
    assert "epoch 2/2" in done.stdout and "4/4" in done.stdout, done.stdout
print("ok")
"""


def _clean_env() -> dict[str, str]:
    """The environment without what would let the venv see this checkout or the dev venv."""
    drop = {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}
    return {k: v for k, v in os.environ.items() if k not in drop}


@pytest.fixture(scope="session")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    here = tmp_path_factory.mktemp("client-only")
    # A copy: pip builds in the source tree, whose build/ would then sit in the checkout.
    source = shutil.copytree(
        ROOT / "client", here / "client", ignore=shutil.ignore_patterns("build", "*.egg-info")
    )
    venv = here / "venv"
    env = _clean_env()
    # No pip of its own (ensurepip takes seconds): this pip installs into it with --python.
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, env=env, timeout=120
    )
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", str(source)],
        check=True,
        env=env,
        timeout=600,
    )
    return python


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_client_alone_runs_the_notebook_and_gradsvc_train(
    client_venv: Path, server: Server, tmp_path: Path
) -> None:
    script = textwrap.dedent(NOTEBOOK).format(url=server.url, server_only=SERVER_ONLY)
    done = subprocess.run(
        [str(client_venv), "-c", script],
        cwd=tmp_path,  # not the checkout: its service/ must not be importable from here
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "ok"
    helped = subprocess.run(
        [str(client_venv.with_name("gradsvc-train")), "--help"],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert helped.returncode == 0 and "--batch-size" in helped.stdout
