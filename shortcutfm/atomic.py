"""Writing files and folders so that a kill, a crash or a full disk never leaves a half-written one under its name.

Every write goes to a hidden temporary sibling (``.<name>.<random>.tmp``) that is renamed over the target only
once it is complete; ``os.replace`` is atomic within one file system. A write that fails removes its temporary
and raises :class:`WriteError`, one line naming the target and the cause; the previous file or folder is left
as it was. A folder that already exists is moved aside, the new one renamed into place, then the old one
removed: a kill between those two renames leaves ``.<name>.old`` beside the missing target, which
:func:`recover_dir` puts back.

This is the one atomic-write helper of the package (checkpoints, exported models, caches, reports use it).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

TEMP_SUFFIX = ".tmp"


class WriteError(OSError):
    """A file or folder could not be written (disk full, permissions, I/O error); the message names it.

    ``errno`` is the failed write's; ``filename`` the target; ``cause`` the system's words for the failure."""

    cause: str = ""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def _hint(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        return "free some disk space"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "check that the folder is writable"
    return "check the disk"


def write_error(target: Path, error: OSError, what: str = "") -> WriteError:
    """A :class:`WriteError` for ``target`` from the ``error`` a write raised (its errno kept)."""
    cause = error.strerror or str(error) or type(error).__name__
    label = f"{what} " if what else ""
    wrapped = WriteError(error.errno or 0, f"could not write {label}{target}: {cause}; {_hint(error)} and try again")
    wrapped.filename, wrapped.cause = str(target), cause
    return wrapped


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _old_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def recover_dir(target: Path) -> None:
    """Put back ``target`` from ``.<name>.old`` if a replacement was killed between its two renames."""
    target, old = Path(target), _old_name(Path(target))
    if old.is_dir() and not target.exists():
        os.replace(old, target)


def _install(temporary: Path, target: Path) -> None:
    if temporary.is_dir() and target.is_dir():
        old = _old_name(target)
        _remove(old)
        os.replace(target, old)
        os.replace(temporary, target)
        _remove(old)
    else:
        os.replace(temporary, target)


@contextmanager
def atomic_path(target: str | Path, *, directory: bool = False, what: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target`` (a folder if ``directory``) to write; install it on success.

    On any exception the temporary is removed and ``target`` is untouched; an ``OSError`` becomes a
    :class:`WriteError` that names ``target`` (``what`` describes it: "checkpoint", "cache shard").
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover_dir(target)
        if directory:
            temporary = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent))
        else:
            handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent)
            os.close(handle)
            temporary = Path(name)
    except OSError as error:
        raise write_error(target, error, what) from error
    try:
        yield temporary
        _install(temporary, target)
    except BaseException as error:
        _remove(temporary)
        if isinstance(error, WriteError) and str(temporary) in (error.filename or ""):
            # a nested atomic write inside ours failed: name our target, not the temporary
            raise write_error(target, OSError(error.errno, error.cause), what) from error
        if isinstance(error, OSError) and not isinstance(error, WriteError):
            raise write_error(target, error, what) from error
        raise


def write_text_atomic(path: str | Path, text: str, *, what: str = "") -> None:
    with atomic_path(path, what=what) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_bytes_atomic(path: str | Path, data: bytes, *, what: str = "") -> None:
    with atomic_path(path, what=what) as temporary:
        temporary.write_bytes(data)


def write_json_atomic(path: str | Path, payload: Any, *, what: str = "") -> None:
    write_text_atomic(path, json.dumps(payload, indent=2), what=what)


def copy_dir_atomic(source: str | Path, target: str | Path, *, what: str = "") -> None:
    """Replace folder ``target`` by a copy of ``source``."""
    with atomic_path(target, directory=True, what=what) as temporary:
        shutil.copytree(source, temporary, dirs_exist_ok=True)

