"""Kernel locks for several writers of one cache folder (processes, containers, machines sharing the file system).

* ``locked(folder)``: an exclusive ``flock`` on the cache's lock file ``.lock``, held only while the manifest is read,
  changed and replaced. The file is created once and never deleted or renamed; the kernel drops the lock when its
  holder ends, however it ends (``kill -9`` included), so there is nothing stale to break.
* ``Writer(folder)``: marks this process as a writer with the file ``.writer-<token>``, on which it holds an
  exclusive ``flock`` while it writes. A writer is alive exactly while that lock is held (:func:`alive`), whatever
  its pid or host. Temporary files carry their writer's token, so only a gone writer's temporaries are deleted.

Writer files are created (and locked) and probed only under the cache lock, so a probe never meets a mark that is
created but not yet locked, and two probes never take each other's probing lock for a live writer.
On NFS, Linux maps ``flock`` onto NFS byte-range locks, which the server drops when a client dies.
"""
from __future__ import annotations

import fcntl
import os
import random
import secrets
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from nnunet_lefusion.errors import LeFusionError

LOCK = ".lock"
WRITER_PREFIX = ".writer-"
TMP_PREFIX = ".tmp-"
LOCK_TIMEOUT_S = 600.0

_token: tuple[int, str] = (0, "")


def token() -> str:
    """This process as ``<pid>@<host>-<random>``: unique even where pids repeat (containers, a forked child)."""
    global _token
    if _token[0] != os.getpid():
        _token = (os.getpid(), f"{os.getpid()}@{socket.gethostname()}-{secrets.token_hex(4)}")
    return _token[1]


def tmp_name(name: str) -> str:
    """The temporary name under which this process writes ``name``."""
    return f"{TMP_PREFIX}{token()}~{name}"


def _try_flock(fd: int) -> bool:
    """Take an exclusive ``flock`` on ``fd`` if it is free; whether it was taken."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@contextmanager
def locked(folder: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the cache lock of ``folder`` (waiting for it, up to ``timeout`` seconds)."""
    path = Path(folder) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while not _try_flock(fd):
            if time.monotonic() > deadline:
                raise LeFusionError(f"the cache {folder} stayed locked by another process for {timeout:.0f} s "
                                    f"({path}); is a writer stuck?")
            time.sleep(random.uniform(0.005, 0.02))
        yield
    finally:
        os.close(fd)  # releases the lock


def alive(writer: str | None, folder: Path) -> bool:
    """Whether the writer ``writer`` (a token) of ``folder`` still runs: its writer file is locked. Call it under the
    cache lock."""
    if not writer:
        return False
    try:
        fd = os.open(Path(folder) / f"{WRITER_PREFIX}{writer}", os.O_RDWR)
    except (FileNotFoundError, NotADirectoryError):
        return False
    try:
        return not _try_flock(fd)
    finally:
        os.close(fd)


def other_writers(folder: Path) -> list[str]:
    """The live writers of ``folder`` other than this process (under the cache lock)."""
    found = (p.name.removeprefix(WRITER_PREFIX) for p in Path(folder).glob(f"{WRITER_PREFIX}*"))
    return sorted(w for w in found if w != token() and alive(w, folder))


def remove_dead_leftovers(folder: Path) -> None:
    """Delete the temporary and writer files of writers that are gone (a killed run leaves them); under the lock."""
    for path in Path(folder).iterdir():
        name = path.name
        if name.startswith(TMP_PREFIX):
            writer = name.removeprefix(TMP_PREFIX).partition("~")[0]
        elif name.startswith(WRITER_PREFIX):
            writer = name.removeprefix(WRITER_PREFIX)
        else:
            continue
        if writer != token() and not alive(writer, folder):
            path.unlink(missing_ok=True)


class Writer:
    """Context manager: this process is a writer of ``folder`` (an exclusive ``flock`` on its writer file)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / f"{WRITER_PREFIX}{token()}"
        self._fd: int | None = None

    def __enter__(self) -> "Writer":
        with locked(self.folder):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _try_flock(fd):
                os.close(fd)
                raise LeFusionError(f"{self.path} is locked by another writer with this process's token")
            self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # a probe that opened it before sees it locked until the close
            os.close(self._fd)
            self._fd = None
