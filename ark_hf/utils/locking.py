"""An output-directory lock, so two runs never write into the same folder.

The lock is a small JSON file, `output_dir/_ark_hf.lock`, holding the owner's pid, host name and process
start time. It is created atomically (`O_CREAT | O_EXCL`) before anything else is written, and removed when
the process exits (normally or by an exception; after SIGKILL it stays behind). A second run on the same
folder is refused while the owner lives:

```
output_dir out/m3 is in use by another run (pid 4121 on host gpu-3, since 2025-05-02 10:14:07);
wait for it to finish, or pick another output_dir. If no such run exists, delete out/m3/_ark_hf.lock
```

A lock whose owner is gone (same host, pid no longer alive or reused by another process) is stale: it is
taken over with a warning. A lock from another host cannot be checked and is always refused. The same
process may take its own lock again (a second trainer on the same folder, as resuming in one script does).

```python
from ark_hf.utils.locking import acquire_output_dir_lock

acquire_output_dir_lock("out/m3")  # held until the process exits
```
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from transformers.utils import logging

logger = logging.get_logger(__name__)

__all__ = ["LOCK_FILE", "OutputDirLockedError", "acquire_output_dir_lock", "check_output_dir_lock", "release"]

LOCK_FILE = "_ark_hf.lock"  # "_*" files are left out of push_to_hub uploads

# lock files this process owns -> whether it created the folder (removed again at exit if left empty)
_held: dict[str, bool] = {}


class OutputDirLockedError(FileExistsError):
    """Another live run holds the output directory's lock."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux `/proc/<pid>/stat` field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name; field 22 overall


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _owner_record() -> dict[str, Any]:
    pid = os.getpid()
    return {"pid": pid, "host": socket.gethostname(), "start_time": _start_time(pid), "created": time.time()}


def _read(lock: Path) -> dict[str, Any] | None:
    try:
        return json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_mine(owner: dict[str, Any]) -> bool:
    return owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname()


def _is_stale(owner: dict[str, Any]) -> bool:
    """Same host and the owning process is gone (or its pid now belongs to a younger process)."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    pid = owner["pid"]
    if not _alive(pid):
        return True
    started = owner.get("start_time")
    return started is not None and _start_time(pid) not in (None, started)


def _refusal(output_dir: str, lock: Path, owner: dict[str, Any] | None) -> OutputDirLockedError:
    if owner is None:
        who = "an unreadable lock file"
    else:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("created", 0)))
        who = f"pid {owner.get('pid')} on host {owner.get('host')}, since {since}"
    return OutputDirLockedError(
        f"output_dir {output_dir} is in use by another run ({who}); wait for it to finish, or pick another "
        f"output_dir. If no such run exists, delete {lock}"
    )


def check_output_dir_lock(output_dir: str | os.PathLike) -> None:
    """Raise `OutputDirLockedError` if another live run holds `output_dir`'s lock; writes nothing."""
    lock = Path(output_dir) / LOCK_FILE
    if not lock.exists():
        return
    owner = _read(lock)
    if owner is not None and (_is_mine(owner) or _is_stale(owner)):
        return
    raise _refusal(str(output_dir), lock, owner)


def acquire_output_dir_lock(output_dir: str | os.PathLike) -> Path:
    """Take `output_dir`'s lock (creating the folder), held until `release` or the process exits.

    Returns:
        The lock file's path.

    Raises:
        OutputDirLockedError: another live run holds it (or a run on another host, which cannot be checked).
    """
    folder = Path(output_dir)
    lock = folder / LOCK_FILE
    key = str(lock.resolve())
    if key in _held and lock.exists():
        return lock
    created_folder = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    for _attempt in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read(lock)
            if owner is not None and _is_mine(owner):
                break
            if owner is not None and _is_stale(owner):
                logger.warning(
                    "%s: removing a stale lock of pid %s on host %s (that process is gone)",
                    lock,
                    owner.get("pid"),
                    owner.get("host"),
                )
                lock.unlink(missing_ok=True)
                continue
            raise _refusal(str(output_dir), lock, owner) from None
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump(_owner_record(), handle)
        break
    else:  # pragma: no cover - another process took the stale lock between our unlink and open
        raise _refusal(str(output_dir), lock, _read(lock))
    if not _held:
        atexit.register(_release_all)
    _held[key] = created_folder
    return lock


def release(output_dir: str | os.PathLike) -> None:
    """Give up `output_dir`'s lock if this process holds it (the folder goes too if this lock made it and it
    is empty)."""
    lock = Path(output_dir) / LOCK_FILE
    key = str(lock.resolve())
    if key not in _held:
        return
    created_folder = _held.pop(key)
    owner = _read(lock)
    if owner is not None and _is_mine(owner):
        lock.unlink(missing_ok=True)
    if created_folder:
        try:
            lock.parent.rmdir()  # only when empty
        except OSError:
            pass


def _release_all() -> None:
    for key in list(_held):
        release(Path(key).parent)
