"""Stepping an async iterator one item at a time, each step its own task, so that a caller can wait
for the next item alongside something else (a keep-alive timer, a shutdown) and, when it gives up,
cancel the iterator right where it is suspended (its cleanup then runs: an engine request is aborted)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Generic, TypeVar

T = TypeVar("T")


class Steps(Generic[T]):
    def __init__(self, source: AsyncIterator[T]) -> None:
        self._source = source
        self._step: asyncio.Future | None = None

    def pending(self) -> asyncio.Future:
        """The step under way (started if none is): wait on it with whatever else matters."""
        if self._step is None:
            self._step = asyncio.ensure_future(anext(self._source))
        return self._step

    def take(self) -> T:
        """The finished step's item; StopAsyncIteration at the end."""
        step, self._step = self._step, None
        assert step is not None and step.done()
        return step.result()

    async def cancel(self) -> None:
        """Cancel a step still under way, inside the iterator, and wait for its cleanup."""
        step, self._step = self._step, None
        if step is not None and not step.done():
            step.cancel()
            with contextlib.suppress(BaseException):
                await step
