"""Invalid requests over HTTP: each is a 4xx application/problem+json, never a 5xx.

One parametrised corpus: malformed bodies, wrong types for every field, unknown fields
(``extra="forbid"``), bad tensors in all three wire forms, shapes that do not fit, limits,
non-finite results, and routing errors. Each case names the status and, where the contract
makes it clear, the problem ``type``. After the corpus the service must still answer the
notebook's first step exactly.
"""

from __future__ import annotations

import base64
import copy
import json
import struct
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import SEED_STEP, assert_problem

DELETE = object()
"""Marks a field for removal in ``edit``."""

NAN = "__NaN__"
INF = "__Infinity__"
NEG_INF = "__-Infinity__"
"""Placeholders that ``raw`` turns into the non-standard literals Python's json accepts."""

JSON = {"content-type": "application/json"}
# Every case must be answered promptly: a limit is checked before memory is allocated.
SECONDS = 10.0


def seed() -> dict[str, Any]:
    return copy.deepcopy(SEED_STEP)


def seed_gradients() -> dict[str, Any]:
    body = seed()
    del body["optimizer"]
    return body


def seed_forward() -> dict[str, Any]:
    return {"model": seed()["model"], "batch": {"x": 1}}


def linear(in_features: int = 2, out_features: int = 1, **extra: Any) -> dict[str, Any]:
    return {
        "model": {
            "type": "linear",
            "in_features": in_features,
            "out_features": out_features,
            **extra,
        },
        "loss": "mse",
        "optimizer": {"type": "sgd", "lr": 0.1},
        "batch": {"x": [[1.0] * in_features], "y": [[1.0] * out_features]},
    }


def sequential(*layers: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": {"type": "sequential", "layers": list(layers)},
        "loss": "mse",
        "optimizer": {"type": "sgd", "lr": 0.1},
        "batch": {"x": [[1.0, 2.0]], "y": [[1.0]]},
    }


def expression(text: str, x: Any, **params: Any) -> dict[str, Any]:
    return {
        "model": {
            "type": "expression",
            "expression": text,
            "params": {name: {"value": value} for name, value in params.items()},
            "dtype": "float64",
        },
        "loss": "squared",
        "optimizer": {"type": "sgd", "lr": 0.1},
        "batch": {"x": x, "y": 0.0},
    }


def classifier(y: Any) -> dict[str, Any]:
    body = linear(2, 3)
    body["loss"] = "cross_entropy"
    body["batch"]["y"] = y
    return body


def edit(body: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``body`` with the field at ``a/b/c`` set to ``value`` (or removed, for DELETE)."""
    *parents, last = path.split("/")
    node: Any = body
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return body


def raw(body: Any) -> dict[str, Any]:
    """Request kwargs sending ``body`` as text, with the placeholders as NaN/Infinity."""
    text = json.dumps(body)
    for marker, literal in ((NAN, "NaN"), (INF, "Infinity"), (NEG_INF, "-Infinity")):
        text = text.replace(f'"{marker}"', literal)
    return {"content": text, "headers": JSON}


def js(body: Any) -> dict[str, Any]:
    return {"json": body}


def text(content: str | bytes, content_type: str = "application/json") -> dict[str, Any]:
    return {"content": content, "headers": {"content-type": content_type}}


def b64_floats(*values: float) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


def nested(depth: int) -> Any:
    value: Any = 1.0
    for _ in range(depth):
        value = [value]
    return value


V = "validation-error"
TENSOR = "invalid-tensor"
SPEC = "invalid-spec"
SHAPE = "shape-mismatch"
NONFINITE = "non-finite"
MALFORMED = "malformed-json"

# The problem types the service documents (app.DESCRIPTION, the OpenAPI document); a client
# can only dispatch on these. "internal" is documented, but never for a client's mistake.
DOCUMENTED_TYPES = {
    "validation-error",
    "malformed-json",
    "invalid-input",
    "invalid-tensor",
    "invalid-expression",
    "invalid-spec",
    "shape-mismatch",
    "non-finite",
    "not-found",
    "method-not-allowed",
    "unavailable",
    "unsupported-media-type",
}

STEP, GRADIENTS, FORWARD = "/v1/step", "/v1/gradients", "/v1/forward"

# (id, path, request kwargs, expected status, expected problem type or None where unclear)
CASES: list[tuple[str, str, dict[str, Any], int, str | None]] = [
    # --- the body as a whole ---------------------------------------------------
    ("malformed-json-truncated", STEP, text('{"model": '), 400, MALFORMED),
    ("malformed-json-trailing-comma", STEP, text('{"batch": {"x": 1},}'), 400, MALFORMED),
    ("malformed-json-single-quotes", STEP, text("{'batch': 1}"), 400, MALFORMED),
    ("malformed-json-bare-word", STEP, text("step"), 400, MALFORMED),
    ("malformed-json-invalid-utf8", STEP, text(b'{"batch": "\xff\xfe"}'), 400, MALFORMED),
    ("empty-body", STEP, text(b""), 422, V),
    ("body-empty-object", STEP, js({}), 422, V),
    ("body-array", STEP, js([seed()]), 422, V),
    ("body-string", STEP, js("step"), 422, V),
    ("body-number", STEP, js(3), 422, V),
    ("body-null", STEP, text("null"), 422, V),
    ("unknown-top-level-field", STEP, js({**seed(), "debug": True}), 422, V),
    ("loss-sent-to-forward", FORWARD, js({**seed_forward(), "loss": "mse"}), 422, V),
    ("optimizer-sent-to-gradients", GRADIENTS, js(seed()), 422, V),
    ("encoding-unknown", STEP, js({**seed(), "encoding": "hex"}), 422, V),
    ("explain-not-bool", STEP, js({**seed(), "explain": "maybe"}), 422, V),
    # --- model -----------------------------------------------------------------
    ("model-missing", STEP, js(edit(seed(), "model", DELETE)), 422, V),
    ("model-string", STEP, js(edit(seed(), "model", "w * x + 1")), 422, V),
    ("model-type-missing", STEP, js(edit(seed(), "model/type", DELETE)), 422, V),
    ("model-type-unknown", STEP, js(edit(seed(), "model/type", "conv2d")), 422, V),
    ("model-type-number", STEP, js(edit(seed(), "model/type", 5)), 422, V),
    ("model-unknown-field", STEP, js(edit(seed(), "model/name", "m")), 422, V),
    ("expression-not-string", STEP, js(edit(seed(), "model/expression", 123)), 422, V),
    ("expression-missing", STEP, js(edit(seed(), "model/expression", DELETE)), 422, V),
    (
        "expression-escape",
        STEP,
        js(edit(seed(), "model/expression", "x.__class__")),
        422,
        "invalid-expression",
    ),
    ("dtype-unknown", STEP, js(edit(seed(), "model/dtype", "float8")), 422, V),
    ("dtype-int64-for-model", STEP, js(edit(seed(), "model/dtype", "int64")), 422, V),
    ("seed-negative", STEP, js(edit(seed(), "model/seed", -1)), 422, V),
    ("seed-string", STEP, js(edit(seed(), "model/seed", "abc")), 422, V),
    ("seed-too-large", STEP, js(edit(seed(), "model/seed", 2**64)), 422, V),
    ("params-list", STEP, js(edit(seed(), "model/params", [])), 422, V),
    ("param-spec-number", STEP, js(edit(seed(), "model/params/w", 1.0)), 422, V),
    (
        "param-spec-unknown-field",
        STEP,
        js(edit(seed(), "model/params/w/requires_grad", False)),
        422,
        V,
    ),
    ("param-value-and-shape", STEP, js(edit(seed(), "model/params/w/shape", [1])), 422, V),
    (
        "param-init-unknown",
        STEP,
        js(edit(seed(), "model/params/w", {"shape": [1], "init": "glorot"})),
        422,
        V,
    ),
    (
        "param-shape-negative",
        STEP,
        js(edit(seed(), "model/params/w", {"shape": [-1], "init": "ones"})),
        422,
        V,
    ),
    (
        "param-shape-too-many-dims",
        STEP,
        js(edit(seed(), "model/params/w", {"shape": [1] * 9, "init": "ones"})),
        422,
        V,
    ),
    (
        "param-std-negative",
        STEP,
        js(edit(seed(), "model/params/w", {"shape": [1], "init": "normal", "std": -1})),
        422,
        V,
    ),
    (
        "param-neither-value-nor-shape",
        STEP,
        js(edit(seed(), "model/params/w", {"init": "ones"})),
        422,
        SPEC,
    ),
    (
        "param-unused-by-expression",
        STEP,
        js(edit(seed(), "model/params/v", {"value": [1.0]})),
        422,
        SPEC,
    ),
    (
        "param-value-ragged",
        STEP,
        js(edit(seed(), "model/params/w/value", [[1.0], []])),
        422,
        TENSOR,
    ),
    (
        "param-value-unknown-tensor-field",
        STEP,
        js(edit(seed(), "model/params/w/value", {"shape": [1], "data": [1.0], "strides": [1]})),
        422,
        TENSOR,
    ),
    (
        "param-over-model-limit-by-shape",
        STEP,
        js(edit(seed(), "model/params/w", {"shape": [10_000, 10_000], "init": "ones"})),
        422,
        SPEC,
    ),
    ("frozen-string", STEP, js(edit(seed(), "model/frozen", "w")), 422, V),
    ("frozen-unknown-parameter", STEP, js(edit(seed(), "model/frozen", ["v"])), 422, SPEC),
    ("frozen-everything", STEP, js(edit(seed(), "model/frozen", ["w"])), 422, SPEC),
    (
        "param-uniform-bounds-reversed",
        GRADIENTS,
        js(
            edit(
                linear(params={"weight": {"shape": [1, 2], "init": "uniform", "a": 5, "b": 1}}),
                "optimizer",
                DELETE,
            )
        ),
        422,
        None,
    ),
    (
        "param-uniform-bounds-beyond-float32",
        GRADIENTS,
        js(
            edit(
                linear(
                    params={"weight": {"shape": [1, 2], "init": "uniform", "a": -1e308, "b": 1e308}}
                ),
                "optimizer",
                DELETE,
            )
        ),
        422,
        None,
    ),
    (
        "param-xavier-gain-beyond-float32",
        GRADIENTS,
        js(
            edit(
                linear(
                    params={"weight": {"shape": [1, 2], "init": "xavier_uniform", "gain": 1e308}}
                ),
                "optimizer",
                DELETE,
            )
        ),
        422,
        None,
    ),
    # --- linear and sequential -------------------------------------------------
    ("linear-unknown-field", STEP, js(linear(activation="relu")), 422, V),
    ("linear-in-features-zero", STEP, js(linear(0)), 422, V),
    ("linear-in-features-fractional", STEP, js(edit(linear(), "model/in_features", 2.5)), 422, V),
    ("linear-in-features-missing", STEP, js(edit(linear(), "model/in_features", DELETE)), 422, V),
    ("linear-bias-not-bool", STEP, js(linear(bias="maybe")), 422, V),
    (
        "linear-params-unknown-name",
        STEP,
        js(linear(params={"w": {"value": [[1.0, 2.0]]}})),
        422,
        SPEC,
    ),
    (
        "linear-param-value-wrong-shape",
        STEP,
        js(linear(params={"weight": {"value": [1.0, 2.0, 3.0]}})),
        422,
        SPEC,
    ),
    (
        "linear-param-shape-wrong",
        STEP,
        js(linear(params={"weight": {"shape": [3, 3], "init": "ones"}})),
        422,
        SPEC,
    ),
    ("linear-wider-than-limit", STEP, js(linear(16_385, 1)), 422, SPEC),
    ("linear-at-width-limit-over-model-limit", STEP, js(linear(16_384, 16_384)), 422, SPEC),
    (
        "sequential-over-model-limit",
        STEP,
        js(sequential(*[{"type": "linear", "in_features": 2_000, "out_features": 2_000}] * 3)),
        422,
        SPEC,
    ),
    ("sequential-too-many-layers", STEP, js(sequential(*[{"type": "relu"}] * 65)), 422, SPEC),
    ("sequential-no-layers", STEP, js(sequential()), 422, V),
    ("sequential-layers-not-list", STEP, js(edit(sequential(), "model/layers", "relu")), 422, V),
    ("layer-unknown-type", STEP, js(sequential({"type": "conv2d"})), 422, V),
    ("layer-unknown-field", STEP, js(sequential({"type": "relu", "inplace": True})), 422, V),
    (
        "layer-linear-unknown-field",
        STEP,
        js(sequential({"type": "linear", "in_features": 2, "out_features": 1, "init": "x"})),
        422,
        V,
    ),
    ("layer-dropout-p-one", STEP, js(sequential({"type": "dropout", "p": 1.0})), 422, V),
    (
        "layer-norm-eps-zero",
        STEP,
        js(sequential({"type": "layer_norm", "normalized_shape": 2, "eps": 0})),
        422,
        V,
    ),
    (
        "layers-do-not-chain",
        STEP,
        js(
            sequential(
                {"type": "linear", "in_features": 2, "out_features": 3},
                {"type": "linear", "in_features": 4, "out_features": 1},
            )
        ),
        422,
        SPEC,
    ),
    # --- loss ------------------------------------------------------------------
    ("loss-missing", GRADIENTS, js(edit(seed_gradients(), "loss", DELETE)), 422, V),
    ("loss-number", STEP, js(edit(seed(), "loss", 5)), 422, V),
    ("loss-unknown", STEP, js(edit(seed(), "loss", "hinge")), 422, V),
    (
        "loss-reduction-unknown",
        STEP,
        js(edit(seed(), "loss", {"type": "mse", "reduction": "avg"})),
        422,
        V,
    ),
    ("loss-unknown-field", STEP, js(edit(seed(), "loss", {"type": "mse", "weight": 2})), 422, V),
    (
        "loss-huber-delta-zero",
        STEP,
        js(edit(seed(), "loss", {"type": "huber", "delta": 0})),
        422,
        V,
    ),
    (
        "loss-label-smoothing-over-one",
        STEP,
        js(edit(seed(), "loss", {"type": "cross_entropy", "label_smoothing": 2})),
        422,
        V,
    ),
    # --- optimizer -------------------------------------------------------------
    ("optimizer-missing", STEP, js(edit(seed(), "optimizer", DELETE)), 422, V),
    ("optimizer-string", STEP, js(edit(seed(), "optimizer", "sgd")), 422, V),
    ("optimizer-type-missing", STEP, js(edit(seed(), "optimizer", {"lr": 0.1})), 422, V),
    ("optimizer-unknown", STEP, js(edit(seed(), "optimizer", {"type": "lbfgs"})), 422, V),
    ("optimizer-unknown-field", STEP, js(edit(seed(), "optimizer/params", [])), 422, V),
    (
        "optimizer-field-of-another",
        STEP,
        js(edit(seed(), "optimizer", {"type": "adam", "momentum": 0.9})),
        422,
        V,
    ),
    ("lr-negative", STEP, js(edit(seed(), "optimizer/lr", -0.1)), 422, V),
    ("lr-string", STEP, js(edit(seed(), "optimizer/lr", "fast")), 422, V),
    ("lr-nan", STEP, raw(edit(seed(), "optimizer/lr", NAN)), 400, MALFORMED),
    ("lr-infinity", STEP, raw(edit(seed(), "optimizer/lr", INF)), 400, MALFORMED),
    ("momentum-negative", STEP, js(edit(seed(), "optimizer/momentum", -1)), 422, V),
    ("weight-decay-negative", STEP, js(edit(seed(), "optimizer/weight_decay", -1)), 422, V),
    ("nesterov-without-momentum", STEP, js(edit(seed(), "optimizer/nesterov", True)), 422, V),
    (
        "nesterov-with-dampening",
        STEP,
        js(
            edit(
                seed(),
                "optimizer",
                {"type": "sgd", "lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True},
            )
        ),
        422,
        V,
    ),
    (
        "betas-first-one",
        STEP,
        js(edit(seed(), "optimizer", {"type": "adam", "betas": [1.0, 0.9]})),
        422,
        V,
    ),
    (
        "betas-negative",
        STEP,
        js(edit(seed(), "optimizer", {"type": "adamw", "betas": [-0.1, 0.9]})),
        422,
        V,
    ),
    (
        "betas-one-value",
        STEP,
        js(edit(seed(), "optimizer", {"type": "adam", "betas": [0.9]})),
        422,
        V,
    ),
    ("clip-grad-norm-zero", STEP, js(edit(seed(), "optimizer/clip_grad_norm", 0)), 422, V),
    # --- batch -----------------------------------------------------------------
    ("batch-missing", STEP, js(edit(seed(), "batch", DELETE)), 422, V),
    ("batch-not-object", STEP, js(edit(seed(), "batch", [1, 3])), 422, V),
    ("batch-unknown-field", STEP, js(edit(seed(), "batch/z", 1)), 422, V),
    ("batch-x-missing", STEP, js(edit(seed(), "batch/x", DELETE)), 422, V),
    (
        "y-missing-for-gradients",
        GRADIENTS,
        js(edit(seed_gradients(), "batch/y", DELETE)),
        422,
        SHAPE,
    ),
    ("y-missing-for-step", STEP, js(edit(seed(), "batch/y", DELETE)), 422, SHAPE),
    ("x-null", STEP, js(edit(seed(), "batch/x", None)), 422, TENSOR),
    ("x-ragged", STEP, js(edit(seed(), "batch/x", [[1.0, 2.0], [3.0]])), 422, TENSOR),
    ("x-strings", STEP, js(edit(seed(), "batch/x", ["1", "2"])), 422, TENSOR),
    ("x-mixed-string", STEP, js(edit(seed(), "batch/x", [1.0, "a"])), 422, TENSOR),
    ("x-booleans", STEP, js(edit(seed(), "batch/x", [True, False])), 422, TENSOR),
    ("x-boolean-scalar", STEP, js(edit(seed(), "batch/x", True)), 422, TENSOR),
    ("x-nested-objects", STEP, js(edit(seed(), "batch/x", [{"a": 1}])), 422, TENSOR),
    ("x-nan", STEP, raw(edit(seed(), "batch/x", NAN)), 400, MALFORMED),
    ("x-infinity", STEP, raw(edit(seed(), "batch/x", INF)), 400, MALFORMED),
    (
        "x-negative-infinity-in-list",
        STEP,
        raw(edit(seed(), "batch/x", [1.0, NEG_INF])),
        400,
        MALFORMED,
    ),
    ("y-nan", STEP, raw(edit(seed(), "batch/y", NAN)), 400, MALFORMED),
    (
        "param-value-infinity",
        STEP,
        raw(edit(seed(), "model/params/w/value", [INF])),
        400,
        MALFORMED,
    ),
    # JSON numbers are numbers: 2**70 is read as the float 1.18e21, but it is no class index.
    (
        "class-target-beyond-int64",
        STEP,
        js(classifier({"dtype": "int64", "shape": [1], "data": [2**70]})),
        422,
        TENSOR,
    ),
    (
        "class-targets-beyond-int64",
        STEP,
        js(classifier({"dtype": "int64", "shape": [2], "data": [1, 2**64]})),
        422,
        TENSOR,
    ),
    (
        "x-overflows-float32",
        STEP,
        js(edit(edit(seed(), "model/dtype", "float32"), "batch/x", [1e39])),
        422,
        TENSOR,
    ),
    ("x-too-many-dims", STEP, js(edit(seed(), "batch/x", nested(9))), 422, TENSOR),
    ("x-empty-batch", STEP, js(edit(seed(), "batch/x", [])), 422, SHAPE),
    (
        "x-empty-batch-object-form",
        STEP,
        js(edit(seed(), "batch/x", {"shape": [0], "data": []})),
        422,
        SHAPE,
    ),
    # --- tensor object forms ---------------------------------------------------
    (
        "data-length-mismatch",
        STEP,
        js(edit(seed(), "batch/x", {"shape": [2, 3], "data": [1, 2, 3, 4, 5]})),
        422,
        TENSOR,
    ),
    (
        "data-not-flat",
        STEP,
        js(edit(seed(), "batch/x", {"shape": [2], "data": [[1.0], [2.0]]})),
        422,
        TENSOR,
    ),
    ("data-not-list", STEP, js(edit(seed(), "batch/x", {"shape": [1], "data": 1.0})), 422, TENSOR),
    (
        "data-and-b64",
        STEP,
        js(edit(seed(), "batch/x", {"shape": [1], "data": [1.0], "b64": b64_floats(1.0)})),
        422,
        TENSOR,
    ),
    (
        "shape-negative",
        STEP,
        js(edit(seed(), "batch/x", {"shape": [-1], "data": [1.0]})),
        422,
        TENSOR,
    ),
    (
        "shape-not-list",
        STEP,
        js(edit(seed(), "batch/x", {"shape": "1", "data": [1.0]})),
        422,
        TENSOR,
    ),
    ("shape-missing", STEP, js(edit(seed(), "batch/x", {"data": [1.0]})), 422, TENSOR),
    (
        "dtype-unknown-in-tensor",
        STEP,
        js(edit(seed(), "batch/x", {"dtype": "float8", "shape": [1], "data": [1.0]})),
        422,
        TENSOR,
    ),
    (
        "int64-non-integral",
        STEP,
        js(edit(seed(), "batch/x", {"dtype": "int64", "shape": [1], "data": [1.5]})),
        422,
        TENSOR,
    ),
    (
        "b64-not-base64",
        STEP,
        js(edit(seed(), "batch/x", {"shape": [1], "b64": "!!!!!!!!"})),
        422,
        TENSOR,
    ),
    (
        "b64-length-mismatch",
        STEP,
        js(edit(seed(), "batch/x", {"shape": [2], "b64": b64_floats(1.0)})),
        422,
        TENSOR,
    ),
    (
        "b64-wrong-itemsize",
        STEP,
        js(edit(seed(), "batch/x", {"dtype": "float64", "shape": [1], "b64": b64_floats(1.0)})),
        422,
        TENSOR,
    ),
    (
        "b64-huge-shape-short-payload",
        STEP,
        js(edit(seed(), "batch/x", {"shape": [100_000_000], "b64": b64_floats(1.0)})),
        422,
        TENSOR,
    ),
    (
        "b64-shape-product-overflows",
        STEP,
        js(edit(seed(), "batch/x", {"shape": [2**40, 2**40], "b64": b64_floats(1.0)})),
        422,
        TENSOR,
    ),
    ("b64-not-string", STEP, js(edit(seed(), "batch/x", {"shape": [1], "b64": 1234})), 422, TENSOR),
    # --- shapes ----------------------------------------------------------------
    ("x-features-mismatch-linear", STEP, js(edit(linear(3), "batch/x", [[1.0, 2.0]])), 422, SHAPE),
    ("y-shape-mismatch", STEP, js(edit(seed(), "batch/y", [3.0, 4.0])), 422, SHAPE),
    ("y-shape-mismatch-linear", STEP, js(edit(linear(), "batch/y", [[1.0, 2.0, 3.0]])), 422, SHAPE),
    ("y-ragged", STEP, js(edit(seed(), "batch/y", [[1.0], [1.0, 2.0]])), 422, TENSOR),
    ("cross-entropy-class-out-of-range", STEP, js(classifier([3])), 422, "invalid-input"),
    ("cross-entropy-class-negative", STEP, js(classifier([-1])), 422, "invalid-input"),
    ("cross-entropy-class-shape", STEP, js(classifier([[0]])), 422, SHAPE),
    (
        "cross-entropy-0d-output-probability-target",
        GRADIENTS,
        js(
            {
                "model": {
                    "type": "expression",
                    "expression": "w * x",
                    "params": {"w": {"value": 1.0}},
                },
                "loss": "cross_entropy",
                "batch": {"x": 1.0, "y": 0.5},
            }
        ),
        422,
        SHAPE,
    ),
    (
        "cross-entropy-3d-output-class-target",
        GRADIENTS,
        js(
            edit(
                edit(classifier([[0] * 5] * 2), "batch/x", [[[1.0, 1.0]] * 5] * 2),
                "optimizer",
                DELETE,
            )
        ),
        422,
        SHAPE,
    ),
    ("inputs-missing", STEP, js(expression("a * x + b", {"x": 1.0}, a=[1.0])), 422, SHAPE),
    (
        "inputs-unknown",
        STEP,
        js(expression("a * x + b", {"x": 1.0, "b": 2.0, "c": 3.0}, a=[1.0])),
        422,
        SHAPE,
    ),
    ("inputs-given-as-one-tensor", STEP, js(expression("a * x + b", 1.0, a=[1.0])), 422, SHAPE),
    ("matmul-shapes", STEP, js(expression("w @ x", [1.0, 2.0], w=[1.0, 2.0, 3.0])), 422, SHAPE),
    ("broadcast-shapes", STEP, js(expression("w * x", [1.0, 2.0], w=[1.0, 2.0, 3.0])), 422, SHAPE),
    # --- results that JSON cannot carry ----------------------------------------
    (
        "forward-log-zero",
        FORWARD,
        js({"model": {"type": "expression", "expression": "log(x)"}, "batch": {"x": 0}}),
        422,
        NONFINITE,
    ),
    (
        "forward-divide-by-zero",
        FORWARD,
        js({"model": {"type": "expression", "expression": "x / 0"}, "batch": {"x": 1}}),
        422,
        NONFINITE,
    ),
    (
        "forward-sqrt-negative",
        FORWARD,
        js({"model": {"type": "expression", "expression": "sqrt(x)"}, "batch": {"x": -1}}),
        422,
        NONFINITE,
    ),
    (
        "gradient-infinite",
        GRADIENTS,
        js(edit(expression("sqrt(w) * x", 1.0, w=[0.0]), "optimizer", DELETE)),
        422,
        NONFINITE,
    ),
    (
        "step-diverges",
        STEP,
        js(edit(edit(seed(), "optimizer/lr", 1e308), "batch/y", 1e10)),
        422,
        NONFINITE,
    ),
    (
        "step-lr-beyond-float32",
        STEP,
        js(edit(edit(seed(), "optimizer/lr", 1e308), "model/dtype", "float32")),
        422,
        NONFINITE,
    ),
]

ROUTING: list[tuple[str, str, str, int, str, str | None]] = [
    # (id, method, path, status, type, Allow header)
    ("unknown-path", "GET", "/v1/nope", 404, "not-found", None),
    ("unknown-path-post", "POST", "/v1/steps", 404, "not-found", None),
    ("unknown-version", "POST", "/v2/step", 404, "not-found", None),
    ("get-step", "GET", "/v1/step", 405, "method-not-allowed", "POST"),
    ("put-forward", "PUT", "/v1/forward", 405, "method-not-allowed", "POST"),
    ("delete-gradients", "DELETE", "/v1/gradients", 405, "method-not-allowed", "POST"),
]

assert len({c[0] for c in CASES}) == len(CASES), "duplicate case ids"


@pytest.mark.parametrize(
    ("path", "request_kwargs", "status", "type_"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_invalid_request_is_a_problem(
    client: TestClient,
    path: str,
    request_kwargs: dict[str, Any],
    status: int,
    type_: str | None,
) -> None:
    start = time.monotonic()
    response = client.post(path, **request_kwargs)
    assert time.monotonic() - start < SECONDS
    assert response.status_code < 500, response.text
    body = assert_problem(response, status)
    if type_ is not None:
        assert body["type"] == type_, body
    assert body["type"] in DOCUMENTED_TYPES, body
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    assert "Traceback" not in response.text
    if body["type"] == V:
        assert body["errors"], body
        for error in body["errors"]:
            assert isinstance(error["loc"], list) and isinstance(error["msg"], str), error
            assert "input" not in error, error


@pytest.mark.parametrize(
    ("method", "path", "status", "type_", "allow"),
    [c[1:] for c in ROUTING],
    ids=[c[0] for c in ROUTING],
)
def test_routing_errors_are_problems(
    client: TestClient, method: str, path: str, status: int, type_: str, allow: str | None
) -> None:
    kwargs = {"json": seed()} if method in {"POST", "PUT"} else {}
    response = client.request(method, path, **kwargs)
    body = assert_problem(response, status)
    assert body["type"] == type_, body
    if allow is not None:
        assert response.headers["allow"] == allow
        assert allow in body["detail"]
    assert "Traceback" not in response.text


def test_deeply_nested_json_is_a_client_error(client: TestClient) -> None:
    # Python's json parser raises RecursionError on this; it must still be a 4xx problem.
    depth = 100_000
    body = '{"model": ' + "[" * depth + "]" * depth + "}"
    response = client.post(STEP, **text(body))
    assert response.status_code < 500, response.text
    problem = assert_problem(response)
    assert response.status_code in {400, 413, 422}, problem
    assert problem["type"] in DOCUMENTED_TYPES, problem


def test_wrong_content_type_is_a_client_error(client: TestClient) -> None:
    response = client.post(STEP, **text(json.dumps(seed()), "text/plain"))
    problem = assert_problem(response, 415)
    assert problem["type"] in DOCUMENTED_TYPES, problem


@pytest.mark.parametrize(
    "request_body",
    [classifier([3]), classifier([-1]), classifier([[0]]), edit(seed(), "batch/y", [3.0, 4.0])],
    ids=["class-out-of-range", "class-negative", "class-shape", "shape"],
)
def test_target_errors_point_at_batch_y(client: TestClient, request_body: dict[str, Any]) -> None:
    body = assert_problem(client.post(STEP, json=request_body), 422)
    # A class index out of range is a bad value, a target of the wrong shape a bad shape.
    assert body["type"] in (SHAPE, "invalid-input"), body
    assert [e["loc"] for e in body["errors"]] == [["body", "batch", "y"]], body


def test_corpus_is_large_enough() -> None:
    assert len(CASES) + len(ROUTING) >= 50


def test_service_still_serves_the_seed_step(client: TestClient, seed_step: dict[str, Any]) -> None:
    # Last in this module: after every invalid request above, nothing is broken or leaked.
    response = client.post(STEP, json=seed_step)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["loss"] == 0.5
    assert body["grads"] == {"w": [-1.0]}
    assert body["params"] == {"w": [1.1]}
    assert body["outputs"] == 2.0
