"""The fair queue's promises at their edges, each held by a scenario as small as it can be.

Each names the promise and the scenario that once broke it. The pool-side ones drive a
``WorkerHandle`` with a stand-in for the worker's socket (what the worker would send, sent
by hand, at real times); the worker-side ones run ``Worker.execute`` in this process; one
starts a real worker (a training job beside reads).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from service.config import Settings
from service.errors import ComputeTimeout
from service.workers import handle as handle_module
from service.workers import messages as m
from service.workers.fair import FairQueue
from service.workers.messages import Info, Job, Progress, Reply
from service.workers.pool import WorkerPool
from tests.workers.test_fair import other, run


def _names(tickets: list[Any], table: dict[int, str]) -> list[str]:
    return [table[t.id] for t in tickets]


# -- fairness -------------------------------------------------------------------------------


def test_a_key_skipped_because_the_runs_are_full_is_first_in_the_next_pass() -> None:
    """Bob's Run is skipped (the pass has its ``max_batch`` of runs: Alice's), then Carol's
    other request is served after him in the same turn. ``next_pass`` moves every key up to
    the last one served to the back, Bob included though he got nothing, so the ring never
    changes and Bob's step never runs while Alice and Carol keep a backlog (here
    max_batch 1; with the default 256 it takes 256 keys with runs ahead of him)."""
    queue = FairQueue()
    table: dict[int, str] = {}
    for k in range(10):
        t = run("alice", f"a{k}")
        table[t.id] = f"alice{k}"
        queue.push(t)
    bob = run("bob", "b")
    table[bob.id] = "bob"
    queue.push(bob)
    for k in range(10):
        t = other("carol")
        table[t.id] = f"carol{k}"
        queue.push(t)
    passes = [_names(queue.next_pass(1), table) for _ in range(5)]
    assert any("bob" in p for p in passes[:2]), passes


# -- the pool and its worker, by hand ---------------------------------------------------------


class _Channel:
    def __init__(self) -> None:
        self.sent: list[Job] = []
        self.lost = False
        self.transport = None

    def send(self, job: Job) -> None:
        self.sent.append(job)


class _Process:
    sentinel = -1
    exitcode = None

    def __init__(self) -> None:
        self.alive = True

    def is_alive(self) -> bool:
        return self.alive

    def kill(self) -> None:
        self.alive = False

    def join(self, timeout: float | None = None) -> None:
        pass


def _pool(tmp_path: Path, **options: Any) -> WorkerPool:
    settings = Settings(
        store=f"sqlite:///{tmp_path / 'gaps.db'}",
        devices="cpu",
        workers_per_device=1,
        api_keys="alice-key,bob-key",
        batch_window_ms=0,
        **options,
    )
    return WorkerPool(settings)


def _up(pool: WorkerPool) -> tuple[Any, _Channel, _Process]:
    handle = pool.workers[0]
    channel, process = _Channel(), _Process()
    handle.channel, handle.process = channel, process  # type: ignore[assignment]
    handle.state = "up"
    handle.up.set()
    return handle, channel, process


def test_the_second_request_of_a_pass_is_blamed_for_the_first_ones_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alice's and Bob's requests (one each: a pass of two) each compute for 0.7 of the
    timeout, within it. The pass has one deadline, from when it was sent, and they run one
    after the other: at the timeout plus grace Bob's has run 0.7 of it, yet he is the one
    answered 504, his key counted as the cause of the recycle. (The default 60 s timeout
    and 2 s grace: two 42 s computations.)"""
    monkeypatch.setattr(handle_module, "GRACE", 0.1)
    timeout = 0.5

    async def main() -> None:
        pool = _pool(tmp_path, compute_timeout=timeout)
        handle = pool.workers[0]
        handle.state = "starting"  # both queue up, then go as one pass when it is up
        alice = asyncio.ensure_future(pool._call("alice", m.Read("alice", "a"), None))
        bob = asyncio.ensure_future(pool._call("bob", m.Read("bob", "b"), None))
        await asyncio.sleep(0)
        handle, channel, process = _up(pool)
        handle._up(1234)
        assert len(channel.sent) == 2  # one pass: both
        first, second = channel.sent
        handle._received(Progress((first.id,), False))
        await asyncio.sleep(0.7 * timeout)
        handle._received(Reply(first.id, True, "alice's answer", Info()))
        bob_started = time.time()
        handle._received(Progress((second.id,), False))
        await asyncio.sleep(0.7 * timeout)  # the watchdog fires in here
        ran = time.time() - bob_started
        assert await alice == "alice's answer"
        if not bob.done():
            handle._received(Reply(second.id, True, "bob's answer", Info()))
        outcome = await asyncio.gather(bob, return_exceptions=True)
        assert ran < timeout
        assert not isinstance(outcome[0], ComputeTimeout), (
            f"bob's computation ran {ran:.2f} s of a {timeout} s timeout and was answered "
            f"{outcome[0]!r}; recycled: {pool.recycled}"
        )

    asyncio.run(main())


def test_close_answers_what_waits_for_a_restarting_worker(tmp_path: Path) -> None:
    """The worker died and waits out its restart back-off when the server stops: the
    requests queued for it (the lost worker's requeued pass, or ones that came in since)
    are never answered by ``close``; they hang until their expiry gives up on the restart
    (2 x timeout + grace + 30 s), or forever once the event loop is gone."""

    async def main() -> None:
        pool = _pool(tmp_path, compute_timeout=5.0)
        handle = pool.workers[0]
        handle.state = "restarting"  # as ``_judge`` leaves it, respawn scheduled
        call = asyncio.ensure_future(pool._call("alice", m.Read("alice", "a"), None))
        await asyncio.sleep(0)
        assert handle.depth == 1
        await pool.close(timeout=0.1)
        await asyncio.sleep(0.05)
        assert call.done(), "a request queued for a restarting worker outlives pool.close()"
        call.cancel()

    asyncio.run(main())


def test_a_pass_is_not_sent_to_a_worker_that_is_being_closed(tmp_path: Path) -> None:
    """``close`` closes the sockets it has; a worker that comes up after (it was being
    respawned) still gets the queue's next pass: ``_dispatch`` does not look at
    ``pool.closing``."""

    async def main() -> None:
        pool = _pool(tmp_path, compute_timeout=5.0)
        handle = pool.workers[0]
        handle.state = "starting"
        call = asyncio.ensure_future(pool._call("alice", m.Read("alice", "a"), None))
        await asyncio.sleep(0)
        pool.closing = True
        channel, process = _Channel(), _Process()
        handle.channel, handle.process = channel, process
        handle._up(1234)
        assert not channel.sent, "a pass went to a worker during close"
        call.cancel()

    asyncio.run(main())


# -- the worker, in this process ----------------------------------------------------------------


def test_a_pass_s_deadline_is_spent_by_whoever_runs_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass of Alice's stateless computation and Bob's ping, sent with one deadline. Alice's
    runs past it (within the grace, so the worker is not recycled) and is answered 200; Bob's,
    next, is answered 504 "waited past the compute timeout" without running: the one that
    overran is answered, the one that did not is not."""
    from tests.workers.test_replies import make_worker

    worker, _ = make_worker(tmp_path / "w.db")
    slow = 0.3

    def stateless(kind: Any, body: Any, idem: Any) -> Any:
        time.sleep(slow)
        from service.workers.jobs import Answer

        return Answer(200, b"{}")

    monkeypatch.setattr(worker, "_stateless", stateless)
    deadline = time.time() + 0.2  # the pass's: sent at once, one for every job of it
    jobs = [
        Job(1, m.Stateless("gradients", None, None), deadline, 1),  # type: ignore[arg-type]
        Job(2, m.Ping(), deadline, 0),
    ]
    replies: dict[int, Reply] = {}
    worker.execute(jobs, lambda r: replies.setdefault(r.job_id, r) if isinstance(r, Reply) else 0)
    assert replies[1].ok  # the overrunning one
    assert replies[2].ok, f"the ping, which took no time, was answered {replies[2].value!r}"


def test_requests_go_before_a_training_jobs_next_mini_batch(tmp_path: Path) -> None:
    """The worker's loop takes requests first and runs a training job's next mini-batch only
    when none is waiting. The pool sends a pass only once the last one is answered, so it
    tells the worker when more wait (``Job.backlog``) and the worker waits for that next pass
    before training. Without it, Alice's 30 reads (30 passes: one other request per key per
    pass) let Bob's training job take a step between every two of them."""
    from service.engine import specs
    from service.workers.jobs import new_id
    from tests.workers.test_fair_pool import SEED_SESSION

    line = {"x": [0.0, 1.0, 2.0, 3.0], "y": [1.0, 3.0, 5.0, 7.0]}

    async def main() -> None:
        pool = _pool(tmp_path, compute_timeout=30.0)
        await pool.start()
        try:
            assert await pool.wait_ready(300)
            alice, bob = new_id(), new_id()
            assert (await pool.create("alice", alice, SEED_SESSION, None)).status == 201
            assert (await pool.create("bob", bob, SEED_SESSION, None)).status == 201
            train = specs.TrainRequest.model_validate(
                {"dataset": line, "epochs": 100000, "batch_size": 1}
            )
            assert (await pool.train("bob", bob, "j_" + new_id(), train, None)).status < 300

            async def bob_step() -> int:
                import orjson

                return int(orjson.loads((await pool.read("bob", bob)).body)["step"])

            while await bob_step() < 5:  # the job is running
                await asyncio.sleep(0.05)
            before = await bob_step()
            await asyncio.gather(*(pool.read("alice", alice) for _ in range(30)))
            taken = await bob_step() - before
            # A mini-batch may slip in before the reads queue up behind the first one, after
            # the last, and where a loaded machine stalls the pool past the worker's wait for
            # its next pass: a few, where going between every pass takes about 30.
            assert taken <= 5, f"bob's job took {taken} steps during alice's 30 queued reads"
        finally:
            await pool.close()

    asyncio.run(main())


def test_a_worker_stuck_as_it_starts_is_recycled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that hangs before it says it is up (a wedged device in ``set_device`` or the
    warm-up, a store that never answers its connect) is never killed: the watchdog is armed
    only for a pass, and a pass goes only to a worker that is up. Its requests are answered
    504 after 2 x timeout + grace + 30 s, each, for as long as the process lives. (Before,
    the first request's timeout plus grace killed it and it was started again.)"""
    monkeypatch.setattr(handle_module, "GRACE", 0.1)
    monkeypatch.setattr(handle_module, "MAX_BACKOFF", 0.0)
    monkeypatch.setattr(handle_module, "STARTUP_TIMEOUT", 0.5)

    async def main() -> None:
        pool = _pool(tmp_path, compute_timeout=0.3)
        handle = pool.workers[0]
        channel, process = _Channel(), _Process()
        handle.channel, handle.process = channel, process  # type: ignore[assignment]
        handle.state = "starting"  # and it stays so: the process hangs in its start
        handle.watch_start()
        call = asyncio.ensure_future(pool._call("alice", m.Read("alice", "a"), None))
        outcome = await asyncio.gather(call, return_exceptions=True)
        assert isinstance(outcome[0], ComputeTimeout)  # after 2 x 0.3 + 0.1 + 0 s
        assert not process.alive, "the stuck worker was left as it is"

    asyncio.run(main())


def test_a_pass_whose_caller_went_away_is_not_run_again_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alice's request is in the worker's pass when her client goes away (the route is
    cancelled: ``withdraw`` drops only queued tickets). The worker is then lost before it
    starts it: the ticket goes back to the queue and runs on the restarted worker, for
    nobody, possibly after the client has already retried it."""

    async def idle() -> None:
        return None

    async def main() -> None:
        pool = _pool(tmp_path, compute_timeout=5.0)
        handle, channel, process = _up(pool)
        monkeypatch.setattr(handle, "_respawn", idle)
        call = asyncio.ensure_future(pool._call("alice", m.Create("alice", "a", None, None), "a"))  # type: ignore[arg-type]
        await asyncio.sleep(0)
        assert len(channel.sent) == 1
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        process.alive, channel.lost = False, True
        handle._exited_seen = True
        handle._judge()
        assert handle.depth == 0, "an abandoned request waits to run on the restarted worker"

    asyncio.run(main())


def test_a_slow_step_in_a_pass_makes_every_step_of_it_late(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Alice's step (no time at all) and Bob's (slow: another signature, or many of his
    sessions) go in one pass, whose one deadline both carry; the pass commits once, after its
    last computation. Bob's takes the pass past the deadline, so Alice's computed step is
    refused at the commit and answered 504 with his: one key's computation costs another's
    step (and Bob can do it pass after pass)."""
    from service.workers import compute
    from tests.workers.test_replies import make_worker
    from tests.workers.test_rounds import create, step

    worker, store = make_worker(tmp_path / "s.db")
    worker.sessions.batching = False  # as for sessions of different signatures
    create(worker.sessions, "a", owner="alice")
    create(worker.sessions, "b", owner="bob")
    real = compute._compute_one

    def compute_one(prepared: Any, limits: Any) -> Any:
        if prepared.job.owner == "bob":
            time.sleep(0.3)
        return real(prepared, limits)

    monkeypatch.setattr(compute, "_compute_one", compute_one)
    deadline = time.time() + 0.2
    jobs = [
        Job(1, m.Run(step("a", 3, owner="alice")), deadline, 1),
        Job(2, m.Run(step("b", 3, owner="bob")), deadline, 0),
    ]
    replies: dict[int, Reply] = {}
    worker.execute(jobs, lambda r: replies.setdefault(r.job_id, r) if isinstance(r, Reply) else 0)
    assert not replies[2].ok  # Bob's own overrun
    assert replies[1].ok, f"alice's step was answered {replies[1].value!r}"
