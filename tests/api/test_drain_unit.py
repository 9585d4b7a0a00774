"""The drain's own bookkeeping, without a server."""

from __future__ import annotations

from service.api.connections import Drain


def test_a_hook_added_once_the_drain_began_runs_at_once() -> None:
    # SIGTERM while the app still starts: the drain begins before the app has said what
    # beginning means (hand the jobs over, end the streams); that must still happen.
    drain = Drain(0)
    drain.begin()
    ran: list[str] = []
    drain.on_begin(lambda: ran.append("late"))
    drain.begin()  # again: nothing more
    assert ran == ["late"]
