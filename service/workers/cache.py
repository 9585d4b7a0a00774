"""The sessions a worker keeps built (model and optimizer on its device), by store version.

An entry stands for exactly one committed version: it is put back only after the commit of
that version succeeded, and a session whose steps are being staged is checked out (taken
out of the cache) until its commits are known. So a failed commit, a failed step that may
have touched the tensors, or a crash between compute and commit can never leave an entry
whose tensors differ from the store's state at its version. Entries are keyed by owner and
session: one key's lookup can never find another key's model.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from service.engine import models, schedulers, specs, state

SessionKey = tuple[str, str]
"""(owner, session id)"""


@dataclass
class Built:
    """A session's model and optimizer, built, at the store version they stand for."""

    version: int
    spec: specs.SessionSpec
    model: models.Model
    optimizer: torch.optim.Optimizer
    scheduler: schedulers.Scheduler | None = None
    accumulator: state.Accumulator | None = None
    """gradients accumulated since the last apply, at this version (``state.Accumulator``)"""


class BuiltCache:
    """A bounded LRU of built sessions; ``size`` 0 keeps none."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[SessionKey, Built] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: SessionKey, version: int) -> Built | None:
        """The entry for exactly this committed version, else None."""
        built = self._entries.get(key)
        if built is None or built.version != version:
            return None
        self._entries.move_to_end(key)
        return built

    def checkout(self, key: SessionKey, version: int) -> Built | None:
        """Like ``get``, but the entry leaves the cache: its tensors are about to change."""
        built = self.get(key, version)
        if built is not None:
            del self._entries[key]
        return built

    def put(self, key: SessionKey, version: int, built: Built) -> None:
        """Keep ``built`` as the state committed at ``version`` (call only after the commit)."""
        if self.size <= 0:
            return
        built.version = version
        self._entries[key] = built
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def drop(self, key: SessionKey) -> None:
        self._entries.pop(key, None)
