"""A bounded executor for computations, so that torch never runs on the event loop.

Computations run on ``threads`` threads; at most ``queue_size`` more may wait. Beyond that a
caller gets ``Unavailable`` (503 with ``Retry-After``) at once rather than an unbounded wait.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

import torch

from service.errors import Unavailable

P = ParamSpec("P")
T = TypeVar("T")


class ComputePool:
    def __init__(self, threads: int, queue_size: int) -> None:
        self.threads = threads
        self.capacity = threads + queue_size
        self.pending = 0
        self.done = 0
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="compute")
        # Share the cores between the compute threads rather than oversubscribe them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // threads))

    @property
    def ready(self) -> bool:
        return not self._executor._shutdown

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        if self.pending >= self.capacity:
            raise Unavailable("every compute slot is busy and the queue is full; retry shortly")
        self.pending += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._executor, functools.partial(fn, *args, **kwargs)
            )
        finally:
            self.pending -= 1
            self.done += 1

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
