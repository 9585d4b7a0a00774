"""``memory://``: a private temporary SQLite file, so that its sessions outlive a worker.

The API process makes it (in a fresh ``tempfile.mkdtemp`` directory that only its user can
read) and hands every worker the same ``sqlite:///`` URL, so any number of workers share the
sessions and a worker that crashes loses none: they last as long as the server process.
The directory is removed when the server stops (its lifespan's end, or ``atexit``). A server
that was SIGKILLed cannot remove its own: the next one to start removes every such directory
whose server (the pid it holds) is gone.

Durability against power loss is not asked of a throwaway store, so it is written with
``synchronous=OFF``: a commit is in the file (the OS's cache) before it is acknowledged,
which is all that a crashed worker needs.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "gradsvc-memory-"


class EphemeralFile:
    def __init__(self) -> None:
        _remove_orphans()
        self.directory = Path(tempfile.mkdtemp(prefix=PREFIX))
        (self.directory / "pid").write_text(str(os.getpid()))
        self.url = f"sqlite:///{self.directory / 'sessions.db'}?synchronous=off"
        atexit.register(self.remove)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        atexit.unregister(self.remove)


def is_memory(url: str) -> bool:
    return url == "memory://" or url.startswith("memory:")


def _remove_orphans() -> None:
    """Remove the directories of memory:// servers that died without removing their own."""
    for directory in Path(tempfile.gettempdir()).glob(PREFIX + "*"):
        try:
            pid = int((directory / "pid").read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(directory, ignore_errors=True)
        except (OSError, ValueError):  # not ours to judge: another user's, or half made
            continue
