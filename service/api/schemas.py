"""Response bodies, and the notebook's examples that the Swagger UI offers first.

Request bodies are the engine's own specs (``engine.specs``): one definition of each.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from service.api.problems import Problem
from service.engine.seed import SEED_MODEL, SEED_SGD, SEED_STEP
from service.engine.specs import Tensor


class TraceNode(BaseModel):
    node: str = Field(description="expression text, layer name, input or parameter name")
    op: str
    inputs: list[str]
    value: Tensor
    grad: Tensor | None = Field(description="dL/dnode")
    local: dict[str, Tensor] | None = Field(
        default=None, description="d node / d input, per element (elementwise nodes only)"
    )


class ForwardResponse(BaseModel):
    outputs: Tensor


class GradientsResponse(ForwardResponse):
    loss: float
    grads: dict[str, Tensor] = Field(description="dL/dθ for every trainable parameter")
    grad_norm: float = Field(description="the gradients' total 2-norm (before any clipping)")
    trace: list[TraceNode] | None = Field(default=None, description='with "explain": true')


class QuantitiesResponse(GradientsResponse):
    quantities: dict[str, dict[str, Tensor]] | None = Field(
        default=None,
        description=(
            'with "quantities": {name: {param: tensor}}; hessian under the key "*" '
            "(docs/quantities.md)"
        ),
    )


class StepResponse(GradientsResponse):
    params: dict[str, Tensor] = Field(description="every parameter after the update")


class Health(BaseModel):
    status: str


_SECOND_MODEL = {**SEED_MODEL, "params": {"w": {"value": [1.1]}}}
_SGD = SEED_SGD


def _example(summary: str, value: dict[str, Any]) -> dict[str, Any]:
    return {"summary": summary, "value": value}


STEP_EXAMPLES = {
    "seed": _example(
        "The notebook's first step: w 1 → 1.1",
        SEED_STEP,
    ),
    "seed-second": _example(
        "The notebook's second step: w 1.1 → 1.46",
        {"model": _SECOND_MODEL, "loss": "squared", "optimizer": _SGD, "batch": {"x": 2, "y": 5}},
    ),
    "explain": _example(
        "The first step, with the chain rule shown",
        {
            "model": SEED_MODEL,
            "loss": "squared",
            "optimizer": _SGD,
            "batch": {"x": 1, "y": 3},
            "explain": True,
        },
    ),
    "mlp": _example(
        "A small MLP, Adam, a batch of two",
        {
            "model": {
                "type": "sequential",
                "layers": [
                    {"type": "linear", "in_features": 2, "out_features": 8},
                    {"type": "relu"},
                    {"type": "linear", "in_features": 8, "out_features": 1},
                ],
                "seed": 0,
            },
            "loss": "mse",
            "optimizer": {"type": "adam", "lr": 0.01},
            "batch": {"x": [[0.0, 1.0], [1.0, 0.0]], "y": [[1.0], [0.0]]},
        },
    ),
}
GRADIENTS_EXAMPLES = {
    "seed": _example(
        "The notebook's first gradient: dL/dw = -1",
        {"model": SEED_MODEL, "loss": "squared", "batch": {"x": 1, "y": 3}},
    ),
    "explain": _example(
        "The same, with the chain rule shown",
        {"model": SEED_MODEL, "loss": "squared", "batch": {"x": 1, "y": 3}, "explain": True},
    ),
}
FORWARD_EXAMPLES = {
    "seed": _example(
        "The notebook's prediction at w = 1: ŷ = 2", {"model": SEED_MODEL, "batch": {"x": 1}}
    ),
    "batch": _example(
        "Three samples at once",
        {"model": SEED_MODEL, "batch": {"x": [1, 2, 3]}},
    ),
}


class Session(BaseModel):
    id: str
    name: str | None
    model: dict[str, Any]
    loss: Any
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None = Field(
        default=None, description="its learning-rate scheduler, if any"
    )
    lr: float = Field(description="the learning rate its next step uses")
    device: str
    step: int = Field(description="optimizer steps applied so far")
    version: int = Field(description='moves on every change; the ETag is "<id>:<version>"')
    params: dict[str, Tensor]
    buffers: dict[str, Tensor] = Field(
        default_factory=dict,
        description="batch-norm's running statistics (running_mean, running_var, "
        "num_batches_tracked), named as parameters are; empty for a model without",
    )
    job: str | None = Field(
        default=None, description="the training job that holds the session, while one does"
    )
    created_at: str
    updated_at: str


class SessionSummary(BaseModel):
    """A session in a listing; its parameters only with ``?include=params``."""

    id: str
    name: str | None
    model_type: Literal["expression", "linear", "sequential"]
    step: int = Field(description="optimizer steps applied so far")
    job: str | None = Field(
        default=None, description="the training job that holds the session, while one does"
    )
    updated_at: str
    params: dict[str, Tensor] | None = Field(default=None, description="with ?include=params")


class SessionList(BaseModel):
    items: list[SessionSummary]
    next: str | None = Field(description="pass as ?cursor= for the next page; null at the end")


LR_DESCRIPTION = "the learning rate the session's next step uses (torch's get_last_lr())"


class SessionStepResponse(StepResponse):
    step: int = Field(description="the session's step after this one")
    lr: float = Field(description=LR_DESCRIPTION)


class AccumulateResponse(ForwardResponse):
    loss: float | None = Field(
        default=None, description="this batch's loss; absent for a batch sent with grad_outputs"
    )
    grads: dict[str, Tensor] = Field(description="this batch's dL/dθ (not the accumulated sum)")
    grad_norm: float = Field(description="the 2-norm of this batch's gradients")
    accumulated: int = Field(description="batches accumulated since the last apply")


class ApplyResponse(BaseModel):
    step: int = Field(description="the session's step after this one")
    lr: float = Field(description=LR_DESCRIPTION)
    applied: int = Field(description="the accumulated batches this step used")
    loss: float | None = Field(
        description="the mean loss of the accumulated batches that had one (sent with y); "
        "null when all came with grad_outputs"
    )
    grads: dict[str, Tensor] = Field(description="scale times the accumulated sum: the step's")
    grad_norm: float = Field(description="their total 2-norm (before any clipping)")
    params: dict[str, Tensor] = Field(description="every parameter after the update")


SESSION_ACCUMULATE_EXAMPLES = {
    "first": _example("The notebook's first sample (1, 3)", {"batch": {"x": 1, "y": 3}}),
}
SESSION_APPLY_EXAMPLES = {
    "sum": _example("The accumulated sum as it is", {}),
    "mean": _example("The mean of two accumulated batches", {"scale": 0.5}),
}


class HistoryItem(BaseModel):
    step: int
    loss: float | None = Field(
        description="the step's loss; null for an apply of batches sent with grad_outputs only"
    )
    grad_norm: float
    lr: float | None = Field(default=None, description=LR_DESCRIPTION)
    at: str


class History(BaseModel):
    items: list[HistoryItem]
    next: str | None


SESSION_EXAMPLES = {
    "seed": _example(
        "The notebook's w, loss and optimizer",
        {"model": SEED_MODEL, "loss": "squared", "optimizer": _SGD, "name": "notebook"},
    ),
}
SESSION_STEP_EXAMPLES = {
    "first": _example("The notebook's first sample (1, 3)", {"batch": {"x": 1, "y": 3}}),
    "second": _example("The notebook's second sample (2, 5)", {"batch": {"x": 2, "y": 5}}),
    "explain": _example(
        "A sample, with the chain rule shown", {"batch": {"x": 1, "y": 3}, "explain": True}
    ),
}


class Worker(BaseModel):
    index: int
    device: str = Field(examples=["cpu", "cuda:0"])
    pid: int | None = Field(description="null while the process starts")
    state: Literal["starting", "up", "restarting", "stopped"]
    queue_depth: int = Field(description="jobs sent to it and not yet answered")
    sessions_held: int = Field(description="sessions it keeps built in memory")
    requests_done: int
    restarts: int


class Workers(BaseModel):
    items: list[Worker]


class SessionsStepResult(BaseModel):
    """One item's answer in ``POST /v1/sessions/step`` (the request's items are
    ``SessionsStepItem``)."""

    session: str
    status: int = Field(description="200, or the status this item's own /step would have had")
    step: int | None = Field(default=None, description="the session's step after this one")
    lr: float | None = Field(default=None, description=LR_DESCRIPTION)
    loss: float | None = None
    grads: dict[str, Tensor] | None = None
    grad_norm: float | None = None
    params: dict[str, Tensor] | None = None
    outputs: Tensor | None = None
    replayed: bool | None = Field(default=None, description="true: answered from its key")
    problem: Problem | None = Field(default=None, description="a problem, if not 200")


class SessionsStepResponse(BaseModel):
    items: list[SessionsStepResult] = Field(description="in request order")


SESSIONS_STEP_EXAMPLES: dict[str, Any] = {
    "two": {
        "summary": "two sessions, one step each",
        "value": {
            "items": [
                {"session": "s_first", "batch": {"x": 1, "y": 3}},
                {"session": "s_second", "batch": {"x": 2, "y": 5}, "idempotency_key": "b-1"},
            ],
            "include": ["loss", "params"],
        },
    }
}


class Job(BaseModel):
    id: str
    session: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: float = Field(ge=0, le=1, description="steps done / total steps")
    epoch: int = Field(description="the epoch under way (1-based); epochs once done")
    epochs: int
    steps_done: int
    total_steps: int
    step: int = Field(description="the session's step")
    loss: float | None = Field(description="the last mini-batch's loss")
    attempts: int = Field(
        description="runs of the job: 1, and one more each time a runner died and another "
        "worker resumed it from its last committed step"
    )
    error: Problem | None = Field(description="a problem, if the job failed")
    created_at: str
    updated_at: str


TRAIN_EXAMPLES: dict[str, Any] = {
    "line": {
        "summary": "fit y = 2x + 1, 3 epochs of 2-row batches",
        "value": {
            "dataset": {"x": [0.0, 1.0, 2.0, 3.0], "y": [1.0, 3.0, 5.0, 7.0]},
            "epochs": 3,
            "batch_size": 2,
            "shuffle": True,
            "seed": 0,
        },
    }
}
