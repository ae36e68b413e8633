"""Separate processes that use one cache at once, for tests/test_cache_safety.py: ``python -m tests.cache_workers ROLE``.

* ``hold FOLDER READY``: become a writer, leave a temporary file, take the cache lock, touch READY, sleep (to be
  killed).
* ``contend FOLDER NAME N PROBE``: touch PROBE/NAME.waiting, then N times add case ``NAME-k`` to the manifest under the
  lock; exits 3 if it ever finds another process inside the lock (a marker file in PROBE).
* ``pool DATASET FOLDER NAME N PROBE``: an online producer of fold 0 (pool_max 1) that starts, waits until every
  producer touched PROBE/*.ready, makes N cases, waits for PROBE/*.done, and prints its run and the cases it made.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from nnunet_lefusion.nnunet.cache_lock import tmp_name
from nnunet_lefusion.nnunet.cache_store import CacheStore


def wait_for(probe: Path, pattern: str, count: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while len(list(probe.glob(pattern))) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {count} {pattern} in {probe}")
        time.sleep(0.02)


def hold(folder: Path, ready: Path) -> None:
    store = CacheStore(folder)
    with store.writer():
        (folder / tmp_name("case.b2nd")).write_bytes(b"half a case")
        with store.locked():
            ready.touch()
            time.sleep(3600)


def contend(folder: Path, name: str, n: int, probe: Path) -> None:
    store = CacheStore(folder)
    (probe / f"{name}.waiting").touch()
    for k in range(n):
        with store.update() as manifest:
            try:
                marker = os.open(probe / "inside", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                sys.exit(3)
            manifest.cases[f"{name}-{k}"] = {"source": name, "slot": k, "run": 0}
            time.sleep(0.002)  # widen the read-change-write window
            os.close(marker)
            os.unlink(probe / "inside")


def pool(dataset: str, folder: Path, name: str, n: int, probe: Path) -> None:
    from nnunet_lefusion.config import TrainerSettings
    from nnunet_lefusion.nnunet.context import DatasetContext
    from nnunet_lefusion.nnunet.online import OnlineProducer, online_labels

    ctx = DatasetContext(dataset, "3d_fullres", 0)
    settings = TrainerSettings(mode="online", online_cases_per_epoch=n, pool_max=1, seed=int(name)).validate()
    producer = OnlineProducer(ctx, folder, online_labels(ctx, folder), settings, "cpu", log=lambda *_: None)
    producer.start()
    (probe / f"{name}.ready").touch()
    wait_for(probe, "*.ready", 2)
    made = [producer.produce(epoch=0) for _ in range(n)]
    (probe / f"{name}.done").touch()
    wait_for(probe, "*.done", 2)
    producer.close()
    print(json.dumps({"run": producer.run["id"], "made": made}))


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    if role == "hold":
        hold(Path(args[0]), Path(args[1]))
    elif role == "contend":
        contend(Path(args[0]), args[1], int(args[2]), Path(args[3]))
    elif role == "pool":
        pool(args[0], Path(args[1]), args[2], int(args[3]), Path(args[4]))
    else:
        raise SystemExit(f"unknown role {role}")
