"""The parse budget: request body bytes being received and parsed at once, all requests
together, so that the API process's memory stays bounded however many large bodies arrive.

A request takes its share when its body starts to arrive (its ``Content-Length``, or each
chunk as it comes when it has none) and gives it back once its body is parsed: a JSON route
right after decoding it, any other route when its answer starts. One event loop serves every
request, so the counts need no lock.
"""

from __future__ import annotations

from starlette.types import Scope

LEASE = "gradsvc.parse_lease"
"""The scope key under which a request's ``Lease`` travels to the route that parses it."""
SMALL = 64 * 1024
"""A body up to this size is always admitted: one key's large bodies must not turn away
another key's ordinary requests, and these together are bounded by the connection limit
(``--max-connections`` × 64 KiB)."""


class ParseBudget:
    """``total`` bytes to share; ``used`` of them held by requests now."""

    def __init__(self, total: int) -> None:
        self.total, self.used = total, 0

    def lease(self) -> Lease:
        return Lease(self)


class Lease:
    """One request's share of the budget: grows as its body arrives, returned at most once."""

    def __init__(self, budget: ParseBudget) -> None:
        self.budget, self.held, self.returned = budget, 0, False

    def take(self, nbytes: int) -> bool:
        """Hold ``nbytes`` more, if the budget has them (or the body is still small); False
        (and nothing held) if not."""
        small = self.held + nbytes <= SMALL
        if self.budget.used + nbytes > self.budget.total and not small:
            return False
        self.budget.used += nbytes
        self.held += nbytes
        return True

    def give_back(self) -> None:
        if not self.returned:
            self.returned = True
            self.budget.used -= self.held
            self.held = 0


def parsed(scope: Scope) -> None:
    """The request's body is parsed: its bytes no longer count against the budget."""
    lease = scope.get(LEASE)
    if isinstance(lease, Lease):
        lease.give_back()
