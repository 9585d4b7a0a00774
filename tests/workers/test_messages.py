"""The pool–worker protocol: a closed set of frozen messages that survive the socket."""

from __future__ import annotations

import dataclasses
import pickle
import typing

from service.engine import specs
from service.workers import messages as m
from service.workers.jobs import Idem, RunJob


def test_every_request_is_a_frozen_message() -> None:
    kinds = typing.get_args(m.Request)
    assert len(kinds) == len(set(kinds)) == 16
    for kind in kinds:
        assert issubclass(kind, m.Message) and dataclasses.is_dataclass(kind), kind
        assert kind.__dataclass_params__.frozen, kind  # type: ignore[attr-defined]


def test_messages_survive_the_socket() -> None:
    batch = specs.SessionBatchRequest.model_validate({"batch": {"x": 1}})
    run = RunJob("forward", "o", "s_1", batch, Idem("o", "k", "f"))
    accumulate = specs.SessionAccumulateRequest.model_validate({"batch": {"x": 1, "y": 3}})
    verbs = (
        m.Accumulate("o", "s_1", accumulate, None, '"s_1:2"'),
        m.Apply("o", "s_1", specs.SessionApplyRequest(scale=0.5), Idem("o", "k", "f"), None),
    )
    for message in (m.Run(run), m.RunMany((run, run)), m.Read("o", "s_1"), m.Ping(), *verbs):
        job = m.Job(1, message, 2.0, 3)
        back = pickle.loads(pickle.dumps(job))
        assert back == job and isinstance(back.message, m.Request)
