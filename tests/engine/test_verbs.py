"""The training verbs in a worker (``Sessions`` on a memory store): k accumulates and an
apply equal one step on the concatenated batch; a step is exactly an accumulate and an apply
of one batch; the accumulator survives a checkpoint and restore, and a checkpoint that lies
about it is refused; ``grad_outputs`` gives torch's ``backward(grad_outputs)``."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
import pytest
import torch

from service.engine import losses, models, optimizers, specs, state, step
from service.engine.limits import DEFAULT_LIMITS
from service.errors import GradsvcError, InvalidInput, NothingAccumulated, SessionBusy
from service.store import open_store
from service.store.memory import MemoryStore
from service.workers.jobs import Answer, RunJob
from service.workers.sessions import Sessions

OWNER = "o"
K, ROUNDS = 3, 3
OPTIMIZERS = {
    "sgd": {"type": "sgd", "lr": 0.1},
    "momentum": {"type": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True},
    "adam": {"type": "adam", "lr": 0.01},
    "adamw": {"type": "adamw", "lr": 0.01, "weight_decay": 0.1},
}


def model_spec() -> dict[str, Any]:
    weight = [[0.5, -0.25, 0.125], [-0.5, 0.75, 0.25]]
    return {
        "type": "linear",
        "in_features": 3,
        "out_features": 2,
        "dtype": "float64",
        "params": {"weight": {"value": weight}, "bias": {"value": [0.1, -0.2]}},
    }


def batch(seed: int, rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 3, generator=gen, dtype=torch.float64)
    return x, torch.randn(rows, 2, generator=gen, dtype=torch.float64)


def body(answer: Answer) -> dict[str, Any]:
    return dict(orjson.loads(answer.body))


def create(sessions: Sessions, sid: str, optimizer: Any, loss: Any = "mse") -> None:
    spec = {"model": model_spec(), "loss": loss, "optimizer": optimizer}
    answer = sessions.create(OWNER, sid, specs.SessionCreate.model_validate(spec), None)
    assert answer.status == 201


def accumulate(sessions: Sessions, sid: str, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    request = specs.SessionAccumulateRequest.model_validate(
        {"batch": {"x": x.tolist(), "y": y.tolist()}}
    )
    return body(sessions.accumulate(OWNER, sid, request, None, None))


def apply(sessions: Sessions, sid: str, scale: float = 1.0) -> dict[str, Any]:
    request = specs.SessionApplyRequest(scale=scale)
    return body(sessions.apply(OWNER, sid, request, None, None))


def stepped(sessions: Sessions, sid: str, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    request = specs.SessionGradientsRequest.model_validate(
        {"batch": {"x": x.tolist(), "y": y.tolist()}}
    )
    return body(sessions.run(RunJob("step", OWNER, sid, request)))


def close(a: dict[str, Any], b: dict[str, Any]) -> None:
    for name in a:
        torch.testing.assert_close(
            torch.tensor(a[name], dtype=torch.float64),
            torch.tensor(b[name], dtype=torch.float64),
            rtol=1e-12,
            atol=1e-12,
        )


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_k_accumulates_and_an_apply_are_one_step_on_the_whole_batch(
    name: str, reduction: str
) -> None:
    sessions = Sessions(MemoryStore(), DEFAULT_LIMITS, 0)
    loss = {"type": "mse", "reduction": reduction}
    create(sessions, "s_acc", OPTIMIZERS[name], loss)
    create(sessions, "s_one", OPTIMIZERS[name], loss)
    scale = 1.0 if reduction == "sum" else 1 / K  # equal micro-batches: the mean of means
    for r in range(ROUNDS):
        parts = [batch(10 * r + i) for i in range(K)]
        counts = [accumulate(sessions, "s_acc", x, y)["accumulated"] for x, y in parts]
        assert counts == list(range(1, K + 1))
        applied = apply(sessions, "s_acc", scale)
        whole = stepped(
            sessions, "s_one", torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])
        )
        assert (applied["step"], applied["applied"]) == (r + 1, K)
        close(applied["params"], whole["params"])
        close(applied["grads"], whole["grads"])
        if reduction == "mean":
            assert applied["loss"] == pytest.approx(whole["loss"], rel=1e-12)
    rows = sessions.history(OWNER, "s_acc", 10, 0)
    assert [row.step for row in rows] == [1, 2, 3]  # one row per apply, none per accumulate
    with pytest.raises(NothingAccumulated):
        apply(sessions, "s_acc")


def test_a_step_is_exactly_an_accumulate_and_an_apply_of_its_batch() -> None:
    sessions = Sessions(MemoryStore(), DEFAULT_LIMITS, 0)
    optimizer = {**OPTIMIZERS["adam"], "clip_grad_norm": 0.5}
    create(sessions, "s_step", optimizer)
    create(sessions, "s_verbs", optimizer)
    for r in range(ROUNDS):
        x, y = batch(r, rows=4)
        one = stepped(sessions, "s_step", x, y)
        accumulated = accumulate(sessions, "s_verbs", x, y)
        two = apply(sessions, "s_verbs")
        assert accumulated["loss"] == one["loss"] and accumulated["grads"] == one["grads"]
        assert two["params"] == one["params"]  # bit for bit
        assert (two["loss"], two["grad_norm"], two["lr"]) == (
            one["loss"],
            one["grad_norm"],
            one["lr"],
        )
    a, b = (sessions.store.history(OWNER, sid, 10, 0) for sid in ("s_step", "s_verbs"))
    assert [(h.step, h.loss, h.grad_norm) for h in a] == [(h.step, h.loss, h.grad_norm) for h in b]


def test_the_accumulator_survives_a_checkpoint_and_a_step_between() -> None:
    sessions = Sessions(MemoryStore(), DEFAULT_LIMITS, 0)
    create(sessions, "s_a", OPTIMIZERS["momentum"])
    create(sessions, "s_b", OPTIMIZERS["momentum"])
    for sid in ("s_a", "s_b"):
        for i in range(2):
            accumulate(sessions, sid, *batch(i))
    data, _ = sessions.checkpoint(OWNER, "s_a")
    tensors, metadata = state.read(data)
    assert sorted(k for k in tensors if k.startswith(state.ACC)) == [
        "accumulator.bias",
        "accumulator.weight",
    ]
    assert sessions.restore(OWNER, "s_c", data, None).status == 201
    stepped(sessions, "s_b", *batch(7))  # a step between leaves the accumulator as it was
    stepped(sessions, "s_c", *batch(7))
    assert accumulate(sessions, "s_c", *batch(2))["accumulated"] == 3
    assert accumulate(sessions, "s_b", *batch(2))["accumulated"] == 3
    assert apply(sessions, "s_c")["params"] == apply(sessions, "s_b")["params"]


def lie(data: bytes, change: dict[str, Any]) -> bytes:
    tensors, metadata = state.read(data)
    tensors = {k: change.get(k, v) for k, v in tensors.items() if change.get(k, v) is not None}
    tensors |= {k: v for k, v in change.items() if k not in tensors and k.startswith(state.ACC)}
    meta = {k: change.get(k, v) for k, v in metadata.items()}
    return state._save(tensors, meta)


@pytest.mark.parametrize(
    "change",
    [
        {"accumulator.weight": torch.full((2, 3), float("nan"), dtype=torch.float64)},
        {"accumulator.weight": torch.zeros(3, 2, dtype=torch.float64)},
        {"accumulator.weight": torch.zeros(2, 3, dtype=torch.float32)},
        {"accumulator.nope": torch.zeros(2, dtype=torch.float64)},
        {"accumulator": '{"count": -1, "loss_sum": 0.0, "losses": 0}'},
        {"accumulator": '{"count": 1, "loss_sum": 0.0, "losses": 2}'},
        {"accumulator": '{"count": 1, "loss_sum": "x", "losses": 1}'},
    ],
    ids=["nan", "shape", "dtype", "unknown", "negative", "losses", "loss-sum"],
)
def test_a_checkpoint_that_lies_about_its_accumulator_is_refused(change: dict[str, Any]) -> None:
    sessions = Sessions(MemoryStore(), DEFAULT_LIMITS, 0)
    create(sessions, "s_a", OPTIMIZERS["sgd"])
    accumulate(sessions, "s_a", *batch(0))
    data, _ = sessions.checkpoint(OWNER, "s_a")
    with pytest.raises(InvalidInput, match="accumulator"):
        sessions.restore(OWNER, "s_lie", lie(data, change), None)
    assert sessions.store.get(OWNER, "s_lie") is None


def test_grad_outputs_give_torchs_backward() -> None:
    model = models.build(specs.LinearModel.model_validate(model_spec()), DEFAULT_LIMITS)
    x, g = batch(3)
    result = step.from_outputs(model, {model.inputs[0]: x}, g)
    weight = torch.tensor(model_spec()["params"]["weight"]["value"], dtype=torch.float64)
    bias = torch.tensor(model_spec()["params"]["bias"]["value"], dtype=torch.float64)
    w, b = weight.requires_grad_(), bias.requires_grad_()
    torch.nn.functional.linear(x, w, b).backward(g)
    assert result.grads is not None and result.loss is None
    torch.testing.assert_close(result.grads["weight"], w.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.grads["bias"], b.grad, rtol=1e-12, atol=1e-12)
    with pytest.raises(GradsvcError, match="shape"):
        step.from_outputs(model, {model.inputs[0]: x}, g[:1])


def test_a_job_holding_the_session_makes_both_verbs_session_busy() -> None:
    store = MemoryStore()
    sessions = Sessions(store, DEFAULT_LIMITS, 0)
    create(sessions, "s_a", OPTIMIZERS["sgd"])
    accumulate(sessions, "s_a", *batch(0))
    record = store._sessions["s_a"]
    store._sessions["s_a"] = replace(record, hold="j_train")  # as a training job takes it
    for call in (lambda: accumulate(sessions, "s_a", *batch(1)), lambda: apply(sessions, "s_a")):
        with pytest.raises(SessionBusy, match="j_train"):
            call()
    assert store.get(OWNER, "s_a") == replace(record, hold="j_train")  # nothing changed


def test_the_accumulator_is_in_the_sqlite_file_for_a_worker_started_anew(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'gradsvc.db'}"
    first = Sessions(open_store(url), DEFAULT_LIMITS, 0)
    create(first, "s_a", OPTIMIZERS["adam"])
    create(first, "s_b", OPTIMIZERS["adam"])
    for i in range(2):
        accumulate(first, "s_a", *batch(i))
        accumulate(first, "s_b", *batch(i))
    want = apply(first, "s_b", 0.5)
    first.store.close()
    again = Sessions(open_store(url), DEFAULT_LIMITS, 0)  # nothing cached: all from the file
    try:
        assert apply(again, "s_a", 0.5)["params"] == want["params"]
    finally:
        again.store.close()


def with_unused(spec: dict[str, Any]) -> models.Model:
    """The linear model with one more trainable parameter that its forward never uses."""
    model = models.build(specs.LinearModel.model_validate(spec), DEFAULT_LIMITS)
    extra = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    model.module.register_parameter("unused", extra)
    return model


ADAM_L2 = {"type": "adam", "lr": 0.01, "weight_decay": 0.1}  # L2 moves a zero gradient's param


def test_an_apply_leaves_a_parameter_no_batch_reached_alone_as_torch_does() -> None:
    model = with_unused(model_spec())
    optimizer = optimizers.build(specs.Adam.model_validate(ADAM_L2), model.trainable().values())
    loss = losses.normalise("mse")
    ref = with_unused(model_spec())
    ref_params = dict(ref.module.named_parameters())
    ref_opt = torch.optim.Adam(list(ref_params.values()), lr=0.01, weight_decay=0.1)
    for r in range(ROUNDS):
        acc = None
        ref_opt.zero_grad(set_to_none=True)
        for i in range(2):
            x, y = batch(10 * r + i)
            result = step.gradients(model, loss, {model.inputs[0]: x}, y)
            assert result.untouched == {"unused"}
            acc = step.accumulated(acc, result)
            out = torch.nn.functional.linear(x, ref_params["weight"], ref_params["bias"])
            torch.nn.functional.mse_loss(out, y).backward()
        assert acc is not None and "unused" not in acc.grads
        applied = step.apply(model, optimizer, acc)
        ref_opt.step()
        assert applied.params is not None and applied.grads is not None
        assert torch.equal(applied.grads["unused"], torch.zeros(2, dtype=torch.float64))
        assert torch.equal(applied.params["unused"], torch.ones(2, dtype=torch.float64))
        for name, value in ref_params.items():
            torch.testing.assert_close(applied.params[name], value.detach(), rtol=1e-12, atol=1e-12)
    unused = model.trainable()["unused"]
    assert unused not in optimizer.state  # no Adam moments, as torch keeps none for it


def test_a_step_is_still_exactly_an_accumulate_and_an_apply_with_an_unused_parameter() -> None:
    loss = losses.normalise("mse")
    runs = []
    for verbs in (False, True):
        model = with_unused(model_spec())
        spec = specs.Adam.model_validate(ADAM_L2)
        optimizer = optimizers.build(spec, model.trainable().values())
        for i in range(2):
            x, y = batch(i)
            inputs = {model.inputs[0]: x}
            if verbs:
                acc = step.accumulated(None, step.gradients(model, loss, inputs, y))
                step.apply(model, optimizer, acc)
            else:
                step.step(model, loss, optimizer, inputs, y)
        runs.append((model.named_parameters(), optimizer.state_dict()["state"]))
    (stepped_params, stepped_state), (applied_params, applied_state) = runs
    assert all(torch.equal(stepped_params[n], applied_params[n]) for n in stepped_params)
    assert stepped_state.keys() == applied_state.keys()
    for index, slots in stepped_state.items():
        assert all(torch.equal(v, applied_state[index][k]) for k, v in slots.items())
