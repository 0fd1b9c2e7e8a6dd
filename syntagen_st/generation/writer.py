"""A background writer: PNG encoding and atomic writes off the accelerator's thread.

Jobs run in order on one thread; the queue is bounded, so at most ``max_pending`` batches wait
in memory and the producer blocks rather than outrunning the disk. A job that fails stops the
writer and its error is raised in the producer at the next submit or at close. A crash loses
at most the batches in the queue: each job writes its files before its manifest shard, so a
rerun sees them as missing and regenerates them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from types import TracebackType

_STOP = object()


class BackgroundWriter:
    """``with BackgroundWriter(2) as w: w.submit(job)``; leaving the block waits for every job."""

    def __init__(self, max_pending: int = 2) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self._jobs: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="syntagen-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not _STOP:
            if self._error is None:  # after a failure the rest are dropped: the rerun redoes them
                try:
                    job()
                except BaseException as err:  # noqa: BLE001 - re-raised in the producer
                    self._error = err
            self._jobs.task_done()
        self._jobs.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job``; blocks while the queue is full. Raises a failed earlier job's error."""
        self._raise()
        self._jobs.put(job)

    def close(self) -> None:
        """Wait for every queued job, stop the thread, and raise the first failure."""
        if self._thread.is_alive():
            self._jobs.put(_STOP)
            self._thread.join()
        self._raise()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if kind is None:
            self.close()
            return
        # The producer failed: finish what is queued (whole batches) and let its error propagate.
        self._jobs.put(_STOP)
        self._thread.join()
