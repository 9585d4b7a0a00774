"""A worker's restart back-off: ever slower while it keeps dying young, from the start again
once it has been healthy; and its exit logged as it really was."""

from __future__ import annotations

import signal

from service.workers.handle import HEALTHY_SECONDS, MAX_BACKOFF, Backoff, exit_status


def test_the_back_off_grows_while_starts_fail_and_resets_after_a_healthy_spell() -> None:
    backoff = Backoff()
    young = [backoff.after_exit(None) for _ in range(8)]  # never said it was up
    assert young == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, MAX_BACKOFF, MAX_BACKOFF]
    assert backoff.after_exit(HEALTHY_SECONDS - 1) == MAX_BACKOFF  # up, but not for long
    assert backoff.after_exit(HEALTHY_SECONDS) == 0.0  # a healthy spell: a one-off exit
    assert backoff.after_exit(None) == 0.5  # the count started over
    assert backoff.after_exit(3.0) == 1.0
    assert backoff.after_exit(None, recycled=True) == 0.0  # an overrun is not the worker's
    assert backoff.after_exit(None) == 0.5


def test_an_exit_is_logged_as_the_signal_or_the_status_it_was() -> None:
    assert exit_status(-signal.SIGKILL) == "killed by SIGKILL"
    assert exit_status(-signal.SIGSEGV) == "killed by SIGSEGV"
    assert exit_status(1) == "exit status 1"
    assert exit_status(0) == "exit status 0"
    assert exit_status(None) == "exit status unknown"
