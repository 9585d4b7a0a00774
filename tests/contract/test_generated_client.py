"""A client generated from openapi/openapi.json by openapi-python-client works: it is made
without a warning, and against a real server it runs the notebook's steps, a bulk step and
the documented examples, parsing every answer. The examples in the document are checked
here to be what the service really answers (ids and times aside).

One generation and one server for the module, made side by side: about 20 s on two
busy cores, most of it the server's start.
"""

from __future__ import annotations

import copy
import importlib
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from service.api import examples, schemas
from service.errors import problem_types
from tests.e2e.server import ROOT, Server

pytestmark = pytest.mark.slow
DOCUMENT = ROOT / "openapi" / "openapi.json"
PACKAGE = "gradsvc_openapi_client"  # not gradsvc_client: that is the real client's name
KEY = "k1"
# What differs from one run to the next: ids and times.
VARYING = {"id", "session", "created_at", "updated_at", "at"}


@pytest.fixture(scope="module")
def booting() -> Iterator[Future[Server]]:
    """A keyed server on memory://, started while the client is generated (each takes
    seconds)."""
    made = Server("--store", "memory://", "--devices", "cpu", "--api-keys", KEY)
    pool = ThreadPoolExecutor(1)
    try:
        yield pool.submit(made.start)
    finally:
        pool.shutdown(wait=True)
        made.stop()


@pytest.fixture(scope="module")
def generated(
    tmp_path_factory: pytest.TempPathFactory, booting: Future[Server]
) -> Iterator[tuple[ModuleType, str]]:
    """The generated package, importable, and what the generator printed."""
    out = tmp_path_factory.mktemp("generated")
    config = out / "config.yaml"
    config.write_text(f"package_name_override: {PACKAGE}\npost_hooks: []\n")
    tool = Path(sys.executable).with_name("openapi-python-client")
    run = subprocess.run(
        [str(tool), "generate", "--path", str(DOCUMENT), "--meta", "none"]
        + ["--config", str(config), "--output-path", str(out / PACKAGE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    printed = run.stdout + run.stderr
    assert run.returncode == 0, printed
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module(PACKAGE), printed
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m.split(".")[0] == PACKAGE]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def server(booting: Future[Server], generated: tuple[ModuleType, str]) -> Server:
    return booting.result()


@pytest.fixture(scope="module")
def client(generated: tuple[ModuleType, str], server: Server) -> Iterator[Any]:
    with generated[0].AuthenticatedClient(base_url=server.url, token=KEY) as made:
        yield made


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"{PACKAGE}.{name}")


# Each operation's module in the generated package, by operationId (snake_case) and tag.
TAGS = {
    "compute": ("forward", "gradients", "step"),
    "jobs": ("train_session", "get_job", "cancel_job"),
}


def _operation(name: str) -> ModuleType:
    tag = next((t for t, names in TAGS.items() if name in names), "sessions")
    return _module(f"api.{tag}.{name}")


def _call(name: str, client: Any, *args: Any, **kwargs: Any) -> tuple[int, Any]:
    """An operation of the generated client: the status and its parsed answer (a dict, where
    the answer is JSON). A None or an UnexpectedStatus is what the document used to cause."""
    response = _operation(name).sync_detailed(*args, client=client, **kwargs)
    parsed = response.parsed
    assert parsed is not None, (name, response.status_code, response.content[:500])
    return response.status_code, parsed.to_dict() if hasattr(parsed, "to_dict") else parsed


def _body(model: str, value: dict[str, Any]) -> Any:
    snake = "".join("_" + c.lower() if c.isupper() else c for c in model).lstrip("_")
    return getattr(_module(f"models.{snake}"), model).from_dict(copy.deepcopy(value))


def _steady(value: Any) -> Any:
    """``value`` with what varies from run to run (ids, times) blanked out."""
    if isinstance(value, dict):
        return {k: "…" if k in VARYING else _steady(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_steady(v) for v in value]
    return value


def _documented(operation: str, name: str) -> Any:
    return _steady(examples.ANSWERS[operation][name])


def test_the_client_is_generated_without_a_warning(generated: tuple[ModuleType, str]) -> None:
    printed = generated[1]
    assert "Generating" in printed  # the tool ran and said so
    assert "warning" not in printed.lower(), printed


def _batch(model: str, batch: dict[str, Any]) -> Any:
    return _body(model, {"batch": batch})


def test_the_notebook_through_the_generated_client(client: Any) -> None:
    """Create, step (1, 3), step (2, 5): loss 0.5 then 1.62, w 1.1 then 1.46, as documented;
    with the session's other operations between, each answered as its example says."""
    create = _body("SessionCreate", schemas.SESSION_EXAMPLES["seed"]["value"])
    status, session = _call("create_session", client, body=create)
    assert status == 201 and _steady(session) == _documented("createSession", "seed")
    sid = session["id"]
    _, forward = _call("session_forward", client, sid, body=_batch("SessionBatchRequest", {"x": 1}))
    assert forward == _documented("sessionForward", "first")

    one, two = {"x": 1, "y": 3}, {"x": 2, "y": 5}
    status, first = _call("step_session", client, sid, body=_batch("SessionGradientsRequest", one))
    assert (status, first["loss"], first["params"], first["outputs"]) == (
        200,
        0.5,
        {"w": [1.1]},
        2.0,
    )
    assert first == _documented("stepSession", "first")
    _, grads = _call("session_gradients", client, sid, body=_batch("SessionGradientsRequest", two))
    assert grads == _documented("sessionGradients", "second")
    _, second = _call("step_session", client, sid, body=_batch("SessionGradientsRequest", two))
    assert (second["outputs"], second["loss"]) == (3.2, 1.6199999999999997)
    assert second["grads"]["w"] == [pytest.approx(-3.6)] and second["params"] == {"w": [1.46]}
    assert second == _documented("stepSession", "second")

    assert _steady(_call("get_session", client, sid)[1]) == _documented(
        "getSession", "after-two-steps"
    )
    assert _steady(_call("get_history", client, sid)[1]) == _documented("getHistory", "two-steps")
    assert _steady(_call("list_sessions", client)[1]) == _documented("listSessions", "one")
    _, checkpoint = _call("get_checkpoint", client, sid)
    _, restored = _call("restore_session", client, body=checkpoint)
    assert _steady(restored) == _documented("restoreSession", "after-two-steps")
    rename = _body("SessionPatch", {"name": "notebook, renamed"})
    assert _steady(_call("update_session", client, sid, body=rename)[1]) == _documented(
        "updateSession", "renamed"
    )
    for gone in (sid, restored["id"]):
        assert _operation("delete_session").sync_detailed(gone, client=client).status_code == 204


def test_a_bulk_step_through_the_generated_client(client: Any) -> None:
    """POST /v1/sessions/step, the answer a generator could not name before: its documented
    request on two new notebook sessions gives its documented answer."""
    create = schemas.SESSION_EXAMPLES["seed"]["value"]
    ids = [_call("create_session", client, body=_body("SessionCreate", create))[1]["id"]]
    ids.append(_call("create_session", client, body=_body("SessionCreate", create))[1]["id"])
    request = copy.deepcopy(schemas.SESSIONS_STEP_EXAMPLES["two"]["value"])
    for item, sid in zip(request["items"], ids, strict=True):
        item["session"] = sid
    status, answer = _call("step_sessions", client, body=_body("SessionsStepRequest", request))
    assert status == 200 and [item["session"] for item in answer["items"]] == ids
    assert [item["params"]["w"] for item in answer["items"]] == [[1.1], [1.4]]
    assert _steady(answer) == _documented("stepSessions", "two")


@pytest.mark.parametrize(
    ("name", "operation", "model", "documented"),
    [
        ("step", "step", "StepRequest", schemas.STEP_EXAMPLES),
        ("gradients", "gradients", "GradientsRequest", schemas.GRADIENTS_EXAMPLES),
        ("forward", "forward", "ForwardRequest", schemas.FORWARD_EXAMPLES),
    ],
)
def test_the_stateless_examples_answer_as_documented(
    client: Any, name: str, operation: str, model: str, documented: dict[str, Any]
) -> None:
    """Each request example of the stateless operations, sent by the generated client, is
    answered with the answer example of the same name (the seed: loss 0.5, w 1.1, ŷ 2)."""
    answers = examples.ANSWERS[operation]
    assert set(answers) <= set(documented)
    for example, answer in answers.items():
        status, got = _call(name, client, body=_body(model, documented[example]["value"]))
        assert (status, got) == (200, answer), example


def test_a_training_job_answers_as_documented(client: Any) -> None:
    """Start, then follow to the end: the job's documented start and finish. A cancelled
    job's example has the fields and status a cancel answers."""
    create = schemas.SESSION_EXAMPLES["seed"]["value"]
    sid = _call("create_session", client, body=_body("SessionCreate", create))[1]["id"]
    train = _body("TrainRequest", schemas.TRAIN_EXAMPLES["line"]["value"])
    status, job = _call("train_session", client, sid, body=train)
    assert status == 202 and job["status"] in ("queued", "running")
    assert set(job) == set(examples.ANSWERS["trainSession"]["line"])
    for _ in range(600):
        _, job = _call("get_job", client, job["id"])
        if job["status"] != "queued" and job["status"] != "running":
            break
        time.sleep(0.05)
    assert _steady(job) == _documented("getJob", "line")
    _, cancelled = _call("cancel_job", client, job["id"])  # over already: answered as it is
    assert set(cancelled) == set(examples.ANSWERS["cancelJob"]["line"])
    assert examples.ANSWERS["cancelJob"]["line"]["status"] == "cancelled"


def test_the_api_answers_its_own_problems_with_the_registered_titles(server: Server) -> None:
    """A path no route serves, and a method a path does not take: the problem type and title
    that errors.problem_types() gives them."""
    registry = problem_types()
    headers = {"Authorization": f"Bearer {KEY}"}
    for method, path in (("GET", "/v1/nowhere"), ("DELETE", "/v1/step")):
        problem = httpx.request(method, server.url + path, headers=headers, timeout=10).json()
        known = registry[problem["type"]]
        assert (problem["status"], problem["title"]) == (known.status, known.title), problem
