"""``memory://``: a private temporary SQLite file, so that its sessions outlive a worker.

The API process makes it (in a fresh ``tempfile.mkdtemp`` directory that only its user can
read) and hands every worker the same ``sqlite:///`` URL, so any number of workers share the
sessions and a worker that crashes loses none: they last as long as the server process.
The directory is removed when the server stops (its lifespan's end, or ``atexit``); only a
SIGKILL of the server itself leaves it behind in the temporary directory.

Durability against power loss is not asked of a throwaway store, so it is written with
``synchronous=OFF``: a commit is in the file (the OS's cache) before it is acknowledged,
which is all that a crashed worker needs.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path


class EphemeralFile:
    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="gradsvc-memory-"))
        self.url = f"sqlite:///{self.directory / 'sessions.db'}?synchronous=off"
        atexit.register(self.remove)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        atexit.unregister(self.remove)


def is_memory(url: str) -> bool:
    return url == "memory://" or url.startswith("memory:")
