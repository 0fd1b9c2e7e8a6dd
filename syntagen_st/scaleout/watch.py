"""A failure on one rank ends every rank, even while the others wait inside a collective.

``Dist.main_first`` shares an error at a point where every rank waits for it. An error in the
middle of a step cannot be shared that way: the other ranks may be inside an ``all_reduce`` or a
barrier, and on NCCL they would wait there for the collective timeout (hours) holding their GPUs.
So the failing rank posts its one-line message to a key-value store of the command's own (a
side channel that no collective uses, hosted by rank 0 whatever launched the ranks), and a
watcher thread on every rank polls it: on a failure it prints that line and ends its process,
which is safe because every file is written atomically and a rerun resumes. Losing the store
means rank 0 died.

A normal end is a handshake over the same store, so that rank 0 (and the store) outlives the
watchers: every rank says it is done and waits for all; then the others leave; then rank 0.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch.distributed as torch_dist

from ..core.errors import first_line
from .dist import COLLECTIVE_TIMEOUT, Dist, RankFailure, describe

_FAILED, _DONE, _LEFT = "failed", "done", "left"
_STORE_TIMEOUT = timedelta(seconds=10)
"""How long a rank tries to reach rank 0's store: the store is listening before the others connect, and a
rank that cannot reach it for this long has lost rank 0 (the client retries until then)."""


def failure_line(dist: Dist, error: BaseException) -> str:
    """What the other ranks print when ``error`` stops this rank."""
    if isinstance(error, RankFailure):
        return str(error)
    if isinstance(error, (KeyboardInterrupt, SystemExit)):  # Lightning turns Ctrl-C into SystemExit(1)
        return f"rank {dist.rank} was interrupted; rerun the same command to resume"
    return f"rank {dist.rank} stopped: {describe(error)}"


def _lost_contact(dist: Dist, err: BaseException) -> str:
    return f"rank {dist.rank}: lost contact with rank 0 ({first_line(err)}); rerun the same command to resume"


def _stopped(rank: int) -> str:
    return f"stopped/{rank}"


class _Watcher(threading.Thread):
    def __init__(self, store: torch_dist.Store, dist: Dist, prog: str, poll_s: float) -> None:
        super().__init__(name="syntagen-rank-watch", daemon=True)
        self.store, self.dist, self.prog, self.poll_s = store, dist, prog, poll_s
        self.quit = threading.Event()

    def run(self) -> None:
        while not self.quit.wait(self.poll_s):
            try:
                text = self._failure()
            except RuntimeError as err:  # the store lives in rank 0: it is gone
                text = _lost_contact(self.dist, err)
            if text is not None and not self.quit.is_set():
                # The main thread may be blocked in a collective that nothing can interrupt: end the
                # process. A raw write: a stalled stdout pipe must not keep it alive.
                os.write(2, f"{self.prog}: error: {' '.join(text.split())}\n".encode())
                os._exit(2)

    def _failure(self) -> str | None:
        """The line another rank posted, once this rank has said it read it."""
        if not self.store.check([_FAILED]):
            return None
        text = self.store.get(_FAILED).decode()
        try:
            _say_stopped(self.store, self.dist)
        except RuntimeError:
            pass  # rank 0 left before this rank said so: its line is read already
        return text

    def stop(self) -> None:
        self.quit.set()
        self.join()


def _say_stopped(store: torch_dist.Store, dist: Dist) -> None:
    """This rank has stopped (a key per rank, so saying it twice counts once); rank 0 hosts the
    store and stays until every rank has said so, or a short while."""
    store.set(_stopped(dist.rank), "1")
    if dist.is_main:
        everyone = [_stopped(r) for r in range(dist.world)]
        deadline = time.monotonic() + 10.0
        while not store.check(everyone) and time.monotonic() < deadline:
            time.sleep(0.05)


def _wait_until(store: torch_dist.Store, key: str, count: int, timeout_s: float) -> bool:
    """Whether ``count`` ranks have added to ``key`` within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def side_channel(dist: Dist) -> torch_dist.TCPStore:
    """A key-value store of its own for one ``watched`` body, hosted by rank 0 beside the process
    group (no collective uses it): rank 0 listens on a free port and tells the others which. A new
    store per use, so no key of an earlier use is ever read again."""
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    server = torch_dist.TCPStore(host, 0, dist.world, is_master=True, wait_for_workers=False) if dist.is_main else None
    port = dist.broadcast(server.port if server is not None else None)
    if server is not None:
        return server
    return torch_dist.TCPStore(host, port, dist.world, is_master=False, timeout=_STORE_TIMEOUT)


@contextmanager
def watched(dist: Dist, prog: str, poll_s: float = 1.0) -> Iterator[None]:
    """The body of a command on every rank: an error on any rank ends all of them with its line."""
    if dist.world == 1:
        yield
        return
    try:
        store = side_channel(dist)
    except RuntimeError as err:  # rank 0, which hosts the store, died before this rank reached it
        raise RankFailure(_lost_contact(dist, err)) from None
    watcher = _Watcher(store, dist, prog, poll_s)
    watcher.start()
    try:
        yield
        _finish(store, dist, watcher)
    except BaseException as err:
        watcher.stop()
        first = _announce(store, dist, err)
        # A collective that failed because another rank died: that rank's own line says why.
        if isinstance(err, RankFailure) and first is not None and first != failure_line(dist, err):
            raise RankFailure(first) from None
        raise


def _finish(store: torch_dist.Store, dist: Dist, watcher: _Watcher) -> None:
    """Wait for every rank (the watcher still ends this one if another fails meanwhile), then the
    others leave, then rank 0 with the store."""
    try:
        store.add(_DONE, 1)
        if not _wait_until(store, _DONE, dist.world, COLLECTIVE_TIMEOUT.total_seconds()):
            raise RankFailure(f"rank {dist.rank}: another rank never finished; rerun the same command to resume")
        watcher.stop()
        store.add(_LEFT, 1)
        if dist.is_main:
            _wait_until(store, _LEFT, dist.world, 60.0)  # the work is done: a rank gone since then costs nothing
    except RuntimeError as err:  # the store went with rank 0
        raise RankFailure(_lost_contact(dist, err)) from None


def _announce(store: torch_dist.Store, dist: Dist, error: BaseException) -> str | None:
    """Post this rank's failure unless an earlier one is there; the first failure's line."""
    try:
        first = store.compare_set(_FAILED, "", failure_line(dist, error)).decode()
        _say_stopped(store, dist)
        return first
    except RuntimeError:  # the store went with rank 0: the caller's own error says enough
        return None
