"""The notebook's answers, as the OpenAPI document shows them beside each operation's 2xx.

Each value is what the service answered to the request examples in ``schemas`` (the seed's
first and second steps, ``seed/backprop-notebook.txt``), ids and times aside; a contract
test replays the requests and compares. Without them Swagger UI and generated clients show
placeholders made from the schema (``"outputs": 0``, ``additionalProp1``).
"""

from __future__ import annotations

from typing import Any

from service.engine.seed import SEED_MODEL, SEED_SGD

SESSION_ID = "s_3AJdv6u9J924v-X0fYQffg"
OTHER_SESSION_ID = "s_F6MjyYrTjZLSG6ncbk_Ggg"
JOB_ID = "j_ILjyJzBKRlUjtk8NGVvHNA"
CREATED = "2026-01-05T09:30:00.000Z"
UPDATED = "2026-01-05T09:30:00.120Z"

# The notebook's two steps: ŷ = w·x + 1, L = ½(ŷ − y)², SGD lr 0.1 from w = 1.
FIRST = {"loss": 0.5, "grads": {"w": [-1.0]}, "grad_norm": 1.0, "outputs": 2.0}
SECOND = {
    "loss": 1.6199999999999997,
    "grads": {"w": [-3.5999999999999996]},
    "grad_norm": 3.5999999999999996,
    "outputs": 3.2,
}
TRACE = [
    {"node": "x", "op": "input", "inputs": [], "value": 1.0, "grad": -1.0},
    {"node": "w", "op": "param", "inputs": [], "value": [1.0], "grad": [-1.0]},
    {
        "node": "w * x",
        "op": "mul",
        "inputs": ["w", "x"],
        "value": [1.0],
        "grad": [-1.0],
        "local": {"w": [1.0], "x": [1.0]},
    },
    {"node": "1", "op": "const", "inputs": [], "value": 1.0, "grad": -1.0},
    {
        "node": "w * x + 1",
        "op": "add",
        "inputs": ["w * x", "1"],
        "value": 2.0,
        "grad": -1.0,
        "local": {"w * x": 1.0, "1": 1.0},
    },
    {"node": "y", "op": "target", "inputs": [], "value": 3.0, "grad": None},
    {"node": "loss", "op": "squared", "inputs": ["w * x + 1", "y"], "value": 0.5, "grad": 1.0},
]


def _session(step: int, version: int, w: float, name: str = "notebook") -> dict[str, Any]:
    return {
        "id": SESSION_ID,
        "name": name,
        "model": SEED_MODEL,
        "loss": "squared",
        "optimizer": SEED_SGD,
        "scheduler": None,
        "lr": 0.1,
        "device": "cpu",
        "step": step,
        "version": version,
        "job": None,
        "params": {"w": [w]},
        "buffers": {},
        "created_at": CREATED,
        "updated_at": CREATED if step == 0 else UPDATED,
    }


def _job(status: str, steps_done: int, epoch: int, loss: float | None) -> dict[str, Any]:
    """schemas.TRAIN_EXAMPLES on a new notebook session: 3 epochs of 2 batches."""
    return {
        "id": JOB_ID,
        "session": OTHER_SESSION_ID,
        "status": status,
        "progress": steps_done / 6,
        "epoch": epoch,
        "epochs": 3,
        "steps_done": steps_done,
        "total_steps": 6,
        "step": steps_done,
        "loss": loss,
        "attempts": 0 if status == "queued" else 1,
        "error": None,
        "created_at": CREATED,
        "updated_at": CREATED if status == "queued" else UPDATED,
    }


STEP = {
    "seed": {**FIRST, "params": {"w": [1.1]}},
    "seed-second": {**SECOND, "params": {"w": [1.46]}},
    "explain": {**FIRST, "params": {"w": [1.1]}, "trace": TRACE},
}
GRADIENTS = {"seed": FIRST, "explain": {**FIRST, "trace": TRACE}}
FORWARD = {"seed": {"outputs": 2.0}, "batch": {"outputs": [2.0, 3.0, 4.0]}}
SESSION_CREATED = {"seed": _session(0, 1, 1.0)}
SESSION_STEP = {
    "first": {"step": 1, "lr": 0.1, **FIRST, "params": {"w": [1.1]}},
    "second": {"step": 2, "lr": 0.1, **SECOND, "params": {"w": [1.46]}},
}
SESSION_GRADIENTS = {"first": FIRST, "second": SECOND}
SESSION_ACCUMULATE = {"first": {**FIRST, "accumulated": 1}}
# After the first sample alone accumulated, on a new notebook session: the first step.
_APPLIED = {k: v for k, v in FIRST.items() if k != "outputs"}
SESSION_APPLY = {"sum": {"step": 1, "lr": 0.1, "applied": 1, **_APPLIED, "params": {"w": [1.1]}}}
SESSION_FORWARD = {"first": {"outputs": 2.0}}
SESSION = {"after-two-steps": _session(2, 3, 1.46)}
# The checkpoint of that session, restored: a new session (its own id and version 1).
SESSION_RESTORED = {"after-two-steps": {**_session(2, 1, 1.46), "updated_at": CREATED}}
SESSION_PATCHED = {"renamed": _session(2, 4, 1.46, name="notebook, renamed")}
SESSION_LIST = {
    "one": {
        "items": [
            {
                "id": SESSION_ID,
                "name": "notebook",
                "model_type": "expression",
                "step": 2,
                "job": None,
                "updated_at": UPDATED,
            }
        ],
        "next": None,
    }
}
HISTORY = {
    "two-steps": {
        "items": [
            {"step": 1, "loss": 0.5, "grad_norm": 1.0, "lr": 0.1, "at": CREATED},
            {
                "step": 2,
                "loss": 1.6199999999999997,
                "grad_norm": 3.5999999999999996,
                "lr": 0.1,
                "at": UPDATED,
            },
        ],
        "next": None,
    }
}
# schemas.SESSIONS_STEP_EXAMPLES on two new notebook sessions.
SESSIONS_STEP = {
    "two": {
        "items": [
            {
                "session": "s_first",
                "status": 200,
                "step": 1,
                "lr": 0.1,
                "loss": 0.5,
                "grad_norm": 1.0,
                "params": {"w": [1.1]},
            },
            {
                "session": "s_second",
                "status": 200,
                "step": 1,
                "lr": 0.1,
                "loss": 2.0,
                "grad_norm": 4.0,
                "params": {"w": [1.4]},
            },
        ]
    }
}
JOB_STARTED = {"line": _job("queued", 0, 1, None)}
JOB_DONE = {"line": _job("succeeded", 6, 3, 0.05188404812499988)}
# Cancelled after the first epoch: the loss is that epoch's last batch's.
JOB_CANCELLED = {"line": _job("cancelled", 2, 2, 2.9331249999999995)}
WORKERS = {
    "one-cpu": {
        "items": [
            {
                "index": 0,
                "device": "cpu",
                "pid": 28444,
                "state": "up",
                "queue_depth": 0,
                "sessions_held": 2,
                "requests_done": 20,
                "restarts": 0,
            }
        ]
    }
}
HEALTHY = {"ok": {"status": "ok"}}
READY = {"ready": {"status": "ready"}}


# By operationId: each operation's success answers, by example name. The request examples
# of the same name (``schemas``) are what was sent.
ANSWERS: dict[str, dict[str, Any]] = {
    "forward": FORWARD,
    "gradients": GRADIENTS,
    "step": STEP,
    "createSession": SESSION_CREATED,
    "restoreSession": SESSION_RESTORED,
    "listSessions": SESSION_LIST,
    "getSession": SESSION,
    "updateSession": SESSION_PATCHED,
    "stepSession": SESSION_STEP,
    "sessionGradients": SESSION_GRADIENTS,
    "sessionForward": SESSION_FORWARD,
    "accumulateSession": SESSION_ACCUMULATE,
    "applySession": SESSION_APPLY,
    "getHistory": HISTORY,
    "stepSessions": SESSIONS_STEP,
    "trainSession": JOB_STARTED,
    "getJob": JOB_DONE,
    "cancelJob": JOB_CANCELLED,
    "listWorkers": WORKERS,
    "health": HEALTHY,
    "ready": READY,
}
