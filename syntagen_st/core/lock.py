"""One writer per folder: an exclusive ``flock`` held for a whole command.

The kernel releases a flock when its process dies, however it dies, so a lock left by a killed
command never blocks a rerun; the file only records who holds it, for the refusal's message.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


@contextmanager
def exclusive(lock_file: Path, what: str) -> Iterator[None]:
    """Hold ``lock_file`` (made, with its folder, if missing) until the block ends; a UserError
    naming the holder's pid and host when another process holds it."""
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as err:
        raise UserError(f"{what}: cannot write there ({err.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 256).decode("utf-8", "replace").split()
        os.close(fd)
        who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
        raise UserError(f"{what} is in use by {who} (one command at a time writes it); "
                        "wait for it to finish or stop it") from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        # Emptied on release: a finished folder's files do not depend on who wrote them last.
        os.ftruncate(fd, 0)
        os.close(fd)
