"""One writer per folder: a training run's output folder and a data cache are locked while a process writes them.

The lock is an OS file lock (``filelock``, ``fcntl.flock`` on POSIX) on ``<folder>/.shortcutfm.lock``: the
kernel drops it when the process ends, however it ends, so a killed run never leaves its folder locked. The
holder's pid, host and start time are written beside it (``.shortcutfm.lock.json``) to name it in the refusal.
"""

from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from .errors import RunStopped

__all__ = ["FolderLocked", "LOCK_NAME", "folder_lock"]

LOCK_NAME = ".shortcutfm.lock"


class FolderLocked(RunStopped):
    """Another process is writing the folder; the message names it and what to do."""


def _holder(folder: Path) -> str:
    try:
        owner = json.loads((folder / f"{LOCK_NAME}.json").read_text())
        return f"pid {owner['pid']} on {owner['host']}, since {owner['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


@contextmanager
def folder_lock(folder: str | Path, *, what: str, instead: str) -> Iterator[None]:
    """Hold the folder's lock for the body; :class:`FolderLocked` at once if another process holds it.

    ``what`` names the folder's role ("training run", "data cache"); ``instead`` the way out ("another
    train.output_dir"), both for the message.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK_NAME, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FolderLocked(
            f"{folder} is in use: another process is writing this {what} ({_holder(folder)}); wait for it to end, "
            f"or use {instead}"
        ) from None
    try:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        (folder / f"{LOCK_NAME}.json").write_text(json.dumps(owner))
        yield
    finally:
        lock.release()
