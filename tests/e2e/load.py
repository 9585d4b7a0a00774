"""A bounded load of single and bulk steps on a few sessions, from several client threads,
recorded for the history checker (``tests.checker``).

Most requests carry Idempotency-Keys and are retried with the same keys, on any of the
servers, while the answer says to come back (a transport error, 409 in flight, 429, 503);
any other answer is definitive: 200 is acknowledged, everything else (504 included) must
have changed nothing. A share of steps go without a key and are sent once: any answer but
200 counts as refused, so a step committed behind an error answer is a phantom the checker
finds. (Under injected crashes that share is 0: a keyless step whose worker died after its
commit cannot be told apart, which is why keys exist.) Some items are bad on purpose (a
non-finite result, a wrong shape), and reads (gradients) are mixed in, which a worker must
run on committed state only.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.checker import Checker

LR = 0.05
FEATURES = 3
SESSION = {
    "model": {"type": "linear", "in_features": FEATURES, "out_features": 1, "dtype": "float64"},
    "loss": "mse",
    "optimizer": {"type": "sgd", "lr": LR},
}
RETRYABLE = {409, 429, 502, 503}
"""409 here: the same key still in flight elsewhere; the rest say to come back"""


@dataclass
class Load:
    servers: Sequence[str]
    sessions: int = 4
    clients: int = 8
    bulk: float = 0.4
    """the share of requests that are ``POST /v1/sessions/step`` with 2 to 6 items"""
    bad: float = 0.15
    """the share of steps (single or items) that are bad on purpose"""
    keyless: float = 0.0
    """the share of single steps sent once, without an Idempotency-Key"""
    reads: float = 0.1
    """the share of requests that are gradients (they change nothing)"""
    items: tuple[int, int] = (2, 6)
    """how many items a bulk request has, at least and at most"""
    statuses: Counter[int] = field(default_factory=Counter)
    """every definitive answer's status, items one by one"""
    headers: Mapping[str, str] = field(default_factory=dict)
    checker: Checker = field(default_factory=lambda: Checker(LR))
    ids: list[str] = field(default_factory=list)
    retries: int = 0

    def create(self, seed: int = 0) -> None:
        with httpx.Client(base_url=self.servers[0], timeout=30, headers=self.headers) as http:
            for n in range(self.sessions):
                spec = {**SESSION, "model": {**SESSION["model"], "seed": seed + n}}
                created = http.post("/v1/sessions", json=spec)
                assert created.status_code == 201, created.text
                body = created.json()
                self.ids.append(body["id"])
                self.checker.created(body["id"], body["params"])

    def run(self, seconds: float) -> None:
        """Drive the load for ``seconds`` (then let every started request finish)."""
        stop = time.monotonic() + seconds
        threads = [
            threading.Thread(target=self._client, args=(stop, random.Random(n)), daemon=True)
            for n in range(self.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 120)
            assert not t.is_alive(), "a load client did not finish"

    def _client(self, stop: float, rng: random.Random) -> None:
        https = [httpx.Client(base_url=s, timeout=30, headers=self.headers) for s in self.servers]
        try:
            while time.monotonic() < stop:
                draw = rng.random()
                if draw < self.reads:
                    self._read(https, rng)
                elif draw < self.reads + self.bulk:
                    self._bulk(https, rng)
                else:
                    self._single(https, rng)
        finally:
            for http in https:
                http.close()

    def _batch(self, rng: random.Random) -> dict[str, Any]:
        rows = rng.randint(1, 4)
        x = [[rng.uniform(-1, 1) for _ in range(FEATURES)] for _ in range(rows)]
        y = [[rng.uniform(-1, 1)] for _ in range(rows)]
        if rng.random() < self.bad:
            if rng.random() < 0.5:
                y[0][0] = 1e308  # the loss overflows: 422 non-finite
            else:
                x[0] = x[0][:-1]  # ragged: 422
        return {"x": x, "y": y}

    def _read(self, https: list[httpx.Client], rng: random.Random) -> None:
        session = rng.choice(self.ids)
        body = {"batch": self._batch(rng)}
        answer = self._send(https, rng, f"/v1/sessions/{session}/gradients", body, None)
        assert answer is not None and answer.status_code in (200, 422, 504), answer

    def _single(self, https: list[httpx.Client], rng: random.Random) -> None:
        session = rng.choice(self.ids)
        path, body = f"/v1/sessions/{session}/step", {"batch": self._batch(rng)}
        if rng.random() < self.keyless:
            try:
                answer: httpx.Response | None = rng.choice(https).post(path, json=body)
            except httpx.TransportError:
                answer = None
        else:
            answer = self._send(https, rng, path, body, uuid.uuid4().hex)
        if answer is not None:
            self.statuses[answer.status_code] += 1
        if answer is not None and answer.status_code == 200:
            self.checker.acknowledged(session, answer.json())
        else:
            self.checker.refused()

    def _bulk(self, https: list[httpx.Client], rng: random.Random) -> None:
        items = [
            {"session": rng.choice(self.ids), "batch": self._batch(rng), "idempotency_key": k}
            for k in (uuid.uuid4().hex for _ in range(rng.randint(*self.items)))
        ]
        body = {"items": items, "include": ["params", "grads", "loss"]}
        for _ in range(200):
            answer = self._send(https, rng, "/v1/sessions/step", body, None)
            assert answer is not None
            if answer.status_code != 200:
                for _ in items:
                    self.checker.refused()
                self.statuses[answer.status_code] += len(items)
                return
            again = []
            for sent, item in zip(items, answer.json()["items"], strict=True):
                if item["status"] not in RETRYABLE:
                    self.statuses[item["status"]] += 1
                if item["status"] == 200:
                    self.checker.acknowledged(item["session"], item)
                elif item["status"] in RETRYABLE:
                    again.append(sent)
                else:
                    self.checker.refused()
            if not again:
                return
            self.retries += 1
            items = again
            body = {**body, "items": items}
            time.sleep(0.05)
        raise AssertionError("a bulk request never got a definitive answer")

    def _send(
        self,
        https: list[httpx.Client],
        rng: random.Random,
        path: str,
        body: dict[str, Any],
        key: str | None,
    ) -> httpx.Response | None:
        headers = {"Idempotency-Key": key} if key else {}
        for _ in range(400):
            http = rng.choice(https)
            try:
                answer = http.post(path, json=body, headers=headers)
            except httpx.TransportError:
                answer = None
            if answer is not None and answer.status_code not in RETRYABLE:
                return answer
            self.retries += 1
            time.sleep(0.05)
        raise AssertionError(f"{path} never got a definitive answer")
