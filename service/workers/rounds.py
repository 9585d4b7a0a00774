"""A worker's session jobs, run in rounds and committed as a prefix of each session's chain.

Jobs that arrive together run in passes. In a pass, each session's jobs form a ``Chain`` in
arrival order, keyed by (owner, session): one key's job can never start from another key's
staged state. Round r runs the r-th link of every chain still going; links of different
sessions that share a signature run as one vmapped call (``compute.computed``). A step's new
state is staged, not committed, and the chain's next link starts from it. After the last
round, every staged step of the pass goes to the store in one transaction (a group commit),
which commits each session's items as a prefix (``SessionStore.commit_many``).

A failed link (an error, a non-finite result, its deadline) is answered and skipped: the
next link starts from the last state the chain applied, never from the failed one; a failed
step that may have touched the model's tensors has the model rebuilt from that state's
bytes. A chain stops, and its remaining links go to the next pass (where they start from the
state the store holds), when a read (gradients, forward) comes behind staged steps: a read
sees committed state only, since its answer may be stored under its Idempotency-Key at once;
and when its staged states reach ``STAGED_BYTES``: each staged step keeps the whole state it
commits (a refused step cuts its chain, and the state before it must then be the one
committed), so that bound is what lets many steps of one large session hold one state at a
time.

A result computed on staged state stands only if that state commits: when a chain's k-th
staged step is refused (another writer moved the session, its key was taken, its deadline
passed), every link computed on it or later is run again, on the newer state. A session's
built model is checked out of the cache while its steps are staged, and goes back, stamped
with the version committed, only when all of them committed and no failed step touched it.
Nothing is answered before its commit, and each job is reported (``on_done``) as soon as
its pass has settled it, so a committed step's answer never waits behind later work.

When a pass fails part-way (store trouble, a bug), what it had settled stands and the rest
of its jobs end with the problem. When ``commit_many`` itself fails, its outcome is unknown:
the pass reads each session's history to learn which staged steps committed; those it cannot
confirm either way end 503, and a retry under the same Idempotency-Key tells the caller.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from service.engine import schedulers, state
from service.engine.step import Result, encode_result
from service.errors import (
    ComputeTimeout,
    GradsvcError,
    InsufficientStorage,
    InvalidInput,
    NotFound,
    PreconditionFailed,
    TooLarge,
    Unavailable,
    short,
)
from service.store import Commit, CommitItem, HistoryRow, SessionRecord
from service.workers import quotas
from service.workers.cache import Built, SessionKey
from service.workers.compute import Prepared, computed, problem
from service.workers.idempotent import replay
from service.workers.jobs import Answer, RunJob, etag
from service.workers.watch import Outcome, Watcher

if TYPE_CHECKING:
    from service.workers.sessions import Sessions

MAX_RETRIES = 100
STAGED_BYTES = 4 * 1024**2
"""Bytes of serialized state a chain keeps staged in a pass beyond its first step: past
them, its next step waits for the next pass (which starts from the state just committed),
so that many steps of one large session hold one state at a time, not one per step."""


def staged_at_once(state_bytes: int, steps: int) -> int:
    """How many of a chain's ``steps`` steps a pass keeps staged at once, at most."""
    return min(steps, max(1, STAGED_BYTES // max(1, state_bytes)))


STEP_HINT = 'ask for "encoding": "b64" (or, in POST /v1/sessions/step, for less with "include")'


def timed_out() -> ComputeTimeout:
    return ComputeTimeout("the request ran past the compute timeout; nothing was changed")


def failure_or(failure: GradsvcError | None, default: GradsvcError) -> GradsvcError:
    """A full store is an answer even when the commit cannot be confirmed: it wrote nothing."""
    return failure if isinstance(failure, InsufficientStorage) else default


def unconfirmed() -> Unavailable:
    return Unavailable(
        "the store did not confirm this step's commit: retry with the same Idempotency-Key to "
        "get its answer if it was applied",
        retry_after=1,
    )


@dataclass
class Staged:
    """A computed step waiting for the pass's commit."""

    index: int
    answer: Answer
    item: CommitItem


@dataclass
class Chain:
    """One session's jobs in this pass: those still to run, and what the run so far left."""

    key: SessionKey
    todo: deque[int] = field(default_factory=deque)
    record: SessionRecord | None = None
    """the state after the last staged step (None until the chain has read the store)"""
    built: Built | None = None
    """the model, checked out of the cache, once a step is under way"""
    base: int = 0
    """the committed version ``built`` was at when checked out"""
    staged: list[Staged] = field(default_factory=list)
    settled: list[tuple[int, int]] = field(default_factory=list)
    """(job index, staged steps it was computed on) of links answered without a commit"""
    stopped: bool = False
    tainted: bool = False
    """``built`` holds steps that did not commit: it must not go back to the cache"""

    @property
    def staged_bytes(self) -> int:
        return sum(len(s.item.record.state) for s in self.staged)

    def full(self) -> bool:
        """Whether another staged step would take the chain past ``STAGED_BYTES`` (one
        more state as large as its last)."""
        if not self.staged:
            return False
        return self.staged_bytes + len(self.staged[-1].item.record.state) > STAGED_BYTES

    def stop(self, index: int | None = None) -> None:
        """No more links this pass; ``index`` (a link not run) goes first in the next."""
        if index is not None:
            self.todo.appendleft(index)
        self.stopped = True


class Pass:
    """One pass over pending jobs: rounds, then one group commit."""

    def __init__(
        self,
        sessions: Sessions,
        jobs: Sequence[RunJob],
        results: list[Outcome | None],
        watcher: Watcher,
        read: Mapping[SessionKey, SessionRecord] | None = None,
    ) -> None:
        self.sessions, self.jobs, self.results = sessions, jobs, results
        self.watcher = watcher
        self.read = read or {}
        """sessions read from the store for this pass already (its chains start there)"""
        self.retried: list[int] = []
        self.chains: dict[SessionKey, Chain] = {}
        self.committed = False

    def run(self, pending: list[int]) -> list[int]:
        """Run ``pending`` (job indices in arrival order); the indices for the next pass."""
        chains = self.chains
        for i in pending:
            key = (self.jobs[i].owner, self.jobs[i].session_id)
            chains.setdefault(key, Chain(key, record=self.read.get(key))).todo.append(i)
        while links := [(c, c.todo.popleft()) for c in chains.values() if c.todo and not c.stopped]:
            self._round(links)
        self._commit(list(chains.values()))
        return [i for chain in chains.values() for i in chain.todo]

    def abort(self, pending: list[int], error: GradsvcError) -> None:
        """The pass failed part-way with ``error``: what it settled on committed state, and
        what it committed, stand; every other job of the pass ends with ``error``."""
        if not self.committed:
            for chain in self.chains.values():
                for i, basis in chain.settled:
                    if basis > 0:
                        self.results[i] = error
        for i in pending:
            if self.results[i] is None:
                self.results[i] = error

    # -- a round ----------------------------------------------------------------------------

    def _round(self, links: list[tuple[Chain, int]]) -> None:
        ready: dict[int, tuple[Chain, Prepared]] = {}
        for chain, i in links:
            if (self.jobs[i].kind != "step" and chain.staged) or chain.full():
                chain.stop(i)
                continue
            try:
                prepared = self._prepare(chain, i)
            except GradsvcError as exc:
                self._fail(chain, i, exc, touched=False)
                continue
            if isinstance(prepared, Answer):
                self._settle(chain, i, prepared)
            else:
                ready[i] = (chain, prepared)
        sessions = self.sessions
        prepared_jobs = [p for _, p in ready.values()]
        watcher = self.watcher

        def before(indices: list[int]) -> None:
            watcher.progress(indices, False)

        stepped: list[tuple[Chain, Prepared, Result, float]] = []
        for prepared, result in computed(prepared_jobs, sessions.limits, sessions.batching, before):
            chain, job = ready[prepared.index][0], prepared.job
            if isinstance(result, GradsvcError):
                self._fail(chain, prepared.index, result, touched=job.kind == "step")
            elif job.kind != "step":
                try:
                    self._read_done(chain, prepared, result)
                except TooLarge as exc:  # its answer
                    self._fail(chain, prepared.index, exc, touched=False)
            elif time.time() > watcher.deadline(prepared.index, job):
                self._fail(chain, prepared.index, timed_out(), touched=True)
            else:
                try:  # after every optimizer step, before its state is dumped
                    lr = schedulers.step(prepared.built.scheduler, prepared.built.optimizer)
                except InvalidInput as exc:  # its next lr broken
                    self._fail(chain, prepared.index, exc, touched=True)
                else:
                    stepped.append((chain, prepared, result, lr))
        # One link per chain in a round, so no other link touches these models meanwhile:
        # their states are dumped together (one layout: one header, one read of the bytes).
        dumped = state.dump_many(
            [
                (b.model, b.optimizer, b.scheduler, b.accumulator)
                for b in (p.built for _, p, _, _ in stepped)
            ]
        )
        for (chain, prepared, result, lr), data in zip(stepped, dumped, strict=True):
            try:
                self._stage(chain, prepared, result, lr, data)
            except InvalidInput as exc:  # its answer too large
                self._fail(chain, prepared.index, exc, touched=True)

    def _prepare(self, chain: Chain, i: int) -> Prepared | Answer:
        job, sessions = self.jobs[i], self.sessions
        if time.time() > self.watcher.deadline(i, job):
            raise timed_out()
        if (stored := replay(sessions.store, job.idem)) is not None:
            return stored
        record = chain.record or sessions.fetch(job.owner, job.session_id)
        chain.record = record
        if job.kind == "step":
            sessions.check_free(record, job.holder)
        if job.if_match is not None and job.if_match not in (etag(record), "*"):
            raise PreconditionFailed(
                f"the session is at {etag(record)}, not {short(job.if_match)}: read it again"
            )
        built = chain.built
        if built is None and job.kind == "step":
            built = chain.built = sessions.checkout(record)
            chain.base = record.version
        elif built is None:
            built = sessions.load(record)
        sessions.budget(job, record.spec)
        if job.kind == "step":
            schedulers.check_can_step(built.scheduler)
        inputs = built.model.decode_inputs(job.request.batch.x, sessions.limits)
        return Prepared(i, job, record, built, inputs)

    def _fail(self, chain: Chain, i: int, error: GradsvcError, *, touched: bool) -> None:
        """Link i ends with ``error``; the chain goes on from the state it had applied."""
        self.results[i] = error
        chain.settled.append((i, len(chain.staged)))
        if touched and chain.built is not None and chain.record is not None:
            chain.built = self.sessions.rebuilt(chain.record)

    def _settle(self, chain: Chain, i: int, answer: Answer) -> None:
        self.results[i] = answer
        chain.settled.append((i, len(chain.staged)))

    def _read_done(self, chain: Chain, prepared: Prepared, result: Result) -> None:
        job = prepared.job
        body = encode_result(result, job.request.encoding == "b64", job.include)
        answer = self.sessions.answer(200, body, prepared.record, hint=STEP_HINT)
        kept = Commit.OK
        if job.idem is not None:
            kept = self.sessions.store.remember(job.idem.record(answer))
        if kept is Commit.CONFLICT:
            self.retried.append(prepared.index)  # the same key was answered meanwhile: replay
            chain.stop(prepared.index)
        elif kept is Commit.QUOTA:
            error = quotas.stored_bytes(self.sessions.store, job.owner)
            self._fail(chain, prepared.index, error, touched=False)
        else:
            self._settle(chain, prepared.index, answer)

    def _stage(
        self, chain: Chain, prepared: Prepared, result: Result, lr: float, data: bytes
    ) -> None:
        """Stage a computed step: ``lr`` its scheduler's next rate, ``data`` its new state."""
        job, record = prepared.job, prepared.record
        now = time.time()
        new = replace(record, state=data, step=record.step + 1, updated_at=now)
        committed = replace(new, version=record.version + 1)
        assert result.loss is not None and result.grad_norm is not None
        history = HistoryRow(new.step, result.loss.item(), result.grad_norm.item(), now, lr)
        body = {
            "step": new.step,
            "lr": lr,
            **encode_result(result, job.request.encoding == "b64", job.include),
        }
        answer = self.sessions.answer(200, body, committed, hint=STEP_HINT)
        idem = job.idem.record(answer) if job.idem else None
        item = CommitItem(new, record.version, history, idem, holder=job.holder)
        chain.staged.append(Staged(prepared.index, answer, item))
        chain.record = committed

    # -- the group commit -------------------------------------------------------------------

    def _commit(self, chains: list[Chain]) -> None:
        now = time.time()
        for chain in chains:  # a caller past its deadline has been told 504: commit nothing
            late = [
                k
                for k, s in enumerate(chain.staged)
                if now > self.watcher.deadline(s.index, self.jobs[s.index])
            ]
            if late:
                self._cut(chain, late[0], timed_out())
        items = [s.item for chain in chains for s in chain.staged]
        outcomes: Iterator[Commit | None]
        failure: GradsvcError | None = None
        if items:
            self.watcher.progress([s.index for chain in chains for s in chain.staged], True)
        try:
            outcomes = iter(self.sessions.store.commit_many(items) if items else [])
        except Exception as exc:
            failure = problem(exc)
            outcomes = iter([s for chain in chains for s in self._confirmed(chain)])
        self.committed = True
        for chain in chains:
            statuses = [next(outcomes) for _ in chain.staged]
            refusal = next((s for s in statuses if s is not Commit.OK), None)
            if failure is None and refusal is Commit.CONFLICT:
                # Refused as moved on, perhaps by this very step: a store's client may have
                # resent a transaction whose first try did commit. The history says. (Any
                # other first refusal is the store's own verdict on that step.)
                statuses = self._confirmed(chain)
            done = next((k for k, s in enumerate(statuses) if s is not Commit.OK), len(statuses))
            for staged in chain.staged[:done]:
                self.results[staged.index] = staged.answer
            self.sessions.steps += done
            if done < len(statuses):
                self._refused(chain, done, statuses[done], failure)
            if chain.built is not None and not chain.tainted:
                self.sessions.cache.put(chain.key, chain.base + done, chain.built)

    def _refused(
        self, chain: Chain, k: int, status: Commit | None, failure: GradsvcError | None
    ) -> None:
        """Staged step k (and so every later one of the chain) did not commit, or may not
        have: answer or rerun each as ``status`` and the commit's ``failure`` say."""
        if status is None:  # unknown: running them again could apply one twice
            self._cut(chain, k, failure_or(failure, unconfirmed()), every=True)
        elif failure is not None:  # the store's trouble is the answer: nothing was written
            self._cut(chain, k, failure, every=True)
        elif status is Commit.GONE:
            self._cut(chain, k, NotFound(f"no session {chain.key[1]}"))
        elif status is Commit.QUOTA:  # this step only: a later one may grow nothing
            self._cut(chain, k, quotas.stored_bytes(self.sessions.store, chain.key[0]))
        else:
            self._cut(chain, k, None)

    def _confirmed(self, chain: Chain) -> list[Commit | None]:
        """Which of the chain's staged steps the store holds (their history rows, stamped to
        the microsecond, are written with them): OK or CONFLICT; None where it cannot say.
        For a ``commit_many`` that failed, or refused a step."""
        if not chain.staged:
            return []
        first = chain.staged[0].item.history
        assert first is not None
        try:
            rows = self.sessions.store.history(*chain.key, len(chain.staged), first.step - 1)
        except Exception:
            return [None] * len(chain.staged)
        held = set(rows)
        return [Commit.OK if s.item.history in held else Commit.CONFLICT for s in chain.staged]

    def _cut(self, chain: Chain, k: int, error: GradsvcError | None, every: bool = False) -> None:
        """Staged step k did not commit: it ends with ``error`` (or runs again), and every link
        computed on it runs again. ``every``: whether k and the steps after it committed is
        unknown, so none of them may run again (that could apply one twice): all end with
        ``error``."""
        after = [s.index for s in chain.staged[k:]]
        rerun = [i for i, basis in chain.settled if basis > k]
        if every:
            for i in after:
                self.results[i] = error
        else:
            rerun = after + rerun
            if error is not None:
                self.results[rerun.pop(0)] = error
        for i in rerun:
            self.results[i] = None
        self.retried += rerun
        chain.todo.extend(rerun)
        chain.staged = chain.staged[:k]
        chain.tainted = True


def run_many(
    sessions: Sessions,
    jobs: Sequence[RunJob],
    watcher: Watcher | None = None,
    read: Mapping[SessionKey, SessionRecord] | None = None,
) -> list[Outcome]:
    """Jobs in arrival order, each applied exactly as it would be alone, one at a time;
    ``watcher`` hears of each outcome as soon as it is final, and of each computation and
    commit before it starts, and says each job's deadline; ``read``: sessions just read
    from the store, where the first pass starts."""
    watcher = watcher or Watcher()
    results: list[Outcome | None] = [None] * len(jobs)
    reported = [False] * len(jobs)
    retries = [0] * len(jobs)
    pending = list(range(len(jobs)))
    while pending:
        one = Pass(sessions, jobs, results, watcher, read)
        read = None
        try:
            again = one.run(pending)
        except Exception as exc:  # store trouble outside a commit, or a bug
            one.abort(pending, problem(exc))
            again = []
        for i in one.retried:
            retries[i] += 1
            if retries[i] >= MAX_RETRIES:  # pragma: no cover
                results[i] = GradsvcError("the session kept moving; gave up")
        pending = sorted(i for i in set(again) if results[i] is None)
        for i in range(len(jobs)):
            if (result := results[i]) is not None and not reported[i]:
                reported[i] = True
                watcher.done(i, result)
    return [r if r is not None else GradsvcError("not computed") for r in results]
