"""One server for the client's tests: each module's own would cost a start (seconds) each."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.server import Server


@pytest.fixture(scope="package")
def server() -> Iterator[Server]:
    with Server("--store", "memory://") as s:
        yield s
