"""Several writers of one cache folder (processes, or machines sharing the file system).

* ``locked(folder)``: a lock file made with ``O_CREAT | O_EXCL`` holding ``<pid>@<host>``, held only while the
  manifest is read, changed and replaced. A lock whose holder is gone is broken: on the same host when its pid is
  dead, from another host when it is older than ``LOCK_STALE_S`` (no update takes that long).
* ``Writer(folder)``: marks this process as a writer with a heartbeat file ``.writer-<pid>@<host>``, touched every
  ``HEARTBEAT_S``. A writer is alive when its pid lives (same host) or its heartbeat is fresh (other hosts).
  Temporary files carry their writer's token, so only a dead writer's temporaries are ever deleted.
"""
from __future__ import annotations

import os
import random
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from nnunet_lefusion.errors import LeFusionError

LOCK = ".lock"
WRITER_PREFIX = ".writer-"
TMP_PREFIX = ".tmp-"
HEARTBEAT_S = 10.0
WRITER_STALE_S = 120.0
LOCK_STALE_S = 60.0
LOCK_TIMEOUT_S = 600.0
HOST = socket.gethostname()


def token() -> str:
    """This process as ``<pid>@<host>``."""
    return f"{os.getpid()}@{HOST}"


def tmp_name(name: str) -> str:
    """The temporary name under which this process writes ``name``."""
    return f"{TMP_PREFIX}{token()}~{name}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def alive(writer: str | None, folder: Path) -> bool:
    """Whether the writer ``<pid>@<host>`` still runs (other hosts: its heartbeat in ``folder`` is fresh)."""
    pid, _, host = (writer or "").partition("@")
    if not pid.isdigit() or not host:
        return False
    if host == HOST:
        return _pid_alive(int(pid))
    try:
        return time.time() - (Path(folder) / f"{WRITER_PREFIX}{writer}").stat().st_mtime < WRITER_STALE_S
    except FileNotFoundError:
        return False


def other_writers(folder: Path) -> list[str]:
    """The live writers of ``folder`` other than this process."""
    found = (p.name.removeprefix(WRITER_PREFIX) for p in Path(folder).glob(f"{WRITER_PREFIX}*"))
    return sorted(w for w in found if w != token() and alive(w, folder))


def remove_dead_leftovers(folder: Path) -> None:
    """Delete the temporary and heartbeat files of writers that are gone (a killed run leaves them)."""
    for path in Path(folder).iterdir():
        name = path.name
        if name.startswith(TMP_PREFIX):
            writer = name.removeprefix(TMP_PREFIX).partition("~")[0]
        elif name.startswith(WRITER_PREFIX):
            writer = name.removeprefix(WRITER_PREFIX)
        else:
            continue
        if not alive(writer, folder):
            path.unlink(missing_ok=True)


def _break_if_stale(path: Path) -> None:
    """Remove the lock ``path`` if its holder is gone; put back a lock that was taken afresh meanwhile."""
    try:
        holder, age = path.read_text(), time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return
    _, _, host = holder.partition("@")
    stale = age > LOCK_STALE_S if not holder or host != HOST else not alive(holder, path.parent)
    if not stale:
        return
    aside = path.with_name(f"{LOCK}.stale-{token()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if aside.read_text() != holder:  # another process broke the stale lock and took it before our rename
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)


@contextmanager
def locked(folder: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the cache lock of ``folder`` (waiting for it, up to ``timeout`` seconds)."""
    path = Path(folder) / LOCK
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _break_if_stale(path)
            if time.monotonic() > deadline:
                raise LeFusionError(f"the cache {folder} stays locked ({path}); if no writer runs, delete that file")
            time.sleep(random.uniform(0.01, 0.05))
            continue
        with os.fdopen(fd, "w") as f:
            f.write(token())
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


class Writer:
    """Context manager: this process is a writer of ``folder`` (heartbeat file, refreshed by a daemon thread)."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / f"{WRITER_PREFIX}{token()}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.path.touch()
            except OSError:
                pass

    def __enter__(self) -> "Writer":
        self.path.touch()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.path.unlink(missing_ok=True)
