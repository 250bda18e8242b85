"""Dynamic batching across devices (`splitleak cloud --batch-max N --batch-delay-ms D`), as Triton's dynamic batcher
does it: the frames of requests from any number of streams are gathered into one ONNX Runtime call of their tail,
until N frames have come or D ms have passed since the first of them, whichever is sooner, and each request is
answered with its own rows of the logits.

Each request is parsed and checked on its own first (cloud/server.py), so a bad one is refused alone and never
reaches a batch; a request of N frames or more runs alone. The batch runs where the tail runs unbatched: on the event
loop for a tail cheap enough (Tail.inline), else on the cloud's pool, where ONNX Runtime releases the GIL and the loop
gathers the next batch meanwhile. docs/cloud.md has what it changes for 8 devices.
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from splitleak.cloud.tail import Tail


@dataclass(frozen=True)
class Batching:
    max_frames: int  # run a batch once it holds this many frames
    delay_s: float  # or this long after its first request came


class Batcher:
    """One tail's batch in the making. Lives on the event loop: `run` is called from the cloud's coroutines."""

    def __init__(self, tail: Tail, batching: Batching, executor: Executor) -> None:
        self.tail = tail
        self.batching = batching
        self.executor = executor
        self.batches = self.frames = 0  # run so far
        self._waiting: list[tuple[np.ndarray, asyncio.Future]] = []
        self._size = 0  # frames waiting
        self._timer: asyncio.TimerHandle | None = None

    async def run(self, activation: np.ndarray) -> np.ndarray:
        """The tail's logits for `activation` (B, ...), run in a batch with whatever other requests come meanwhile."""
        loop = asyncio.get_running_loop()
        if self._waiting and self._size + len(activation) > self.batching.max_frames:
            self._flush()  # it would not fit: what waits goes now, as the batch it is
        answer = loop.create_future()
        self._waiting.append((activation, answer))
        self._size += len(activation)
        if self._size >= self.batching.max_frames:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.batching.delay_s, self._flush)
        return await answer

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._waiting, self._size = self._waiting, [], 0
        batch = np.concatenate([a for a, _ in waiting]) if len(waiting) > 1 else waiting[0][0]
        self.batches += 1
        self.frames += len(batch)
        if not self.tail.inline:
            ran = asyncio.get_running_loop().run_in_executor(self.executor, self.tail.run, batch)
            ran.add_done_callback(functools.partial(self._ran, waiting))
            return
        try:
            logits = self.tail.run(batch)
        except Exception as e:  # noqa: BLE001 - each request's handler reports it as the cloud's fault
            self._answer(waiting, e, None)
        else:
            self._answer(waiting, None, logits)

    def _ran(self, waiting: list[tuple[np.ndarray, asyncio.Future]], ran: asyncio.Future) -> None:
        error = asyncio.CancelledError() if ran.cancelled() else ran.exception()
        self._answer(waiting, error, None if error is not None else ran.result())

    @staticmethod
    def _answer(
        waiting: list[tuple[np.ndarray, asyncio.Future]], error: BaseException | None, logits: np.ndarray | None
    ) -> None:
        row = 0
        for activation, answer in waiting:
            if not answer.done():  # not cancelled with its call
                if error is not None:
                    answer.set_exception(error)
                else:
                    answer.set_result(logits[row : row + len(activation)])
            row += len(activation)
