"""Writing files so that a crash never leaves half of one under its final name, and the lock that
keeps a second process out of a folder another one is writing."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

# Temp files are named ".<final name>.pid<N>.<anything>tmp", so that a later writer can tell the
# leftovers of a killed process (SIGKILL, power loss: no chance to clean up) from a live writer's.
_TEMP_PID = re.compile(r"^\..*\.pid(\d+)\.(?:[^.]*\.)?tmp$")
# Bytes per read or write when streaming a file: few system calls, yet progress that keeps moving.
CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks (the archives are hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def temp_name(path: Path) -> str:
    """The name a writer of `path` uses for its temp file (the form remove_stale_temporaries knows)."""
    return f".{path.name}.pid{os.getpid()}.tmp"


def atomic_write(path: Path, write) -> None:
    """Call `write(file_object)` on a temp file beside `path`, then rename it into place.

    On any error the temp file is removed and the previous `path` (if any) is untouched. After a
    success, temp files that killed writers left in the same folder are removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.pid{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)
    remove_stale_temporaries(path.parent)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete temp files in `folder` whose writer process is gone; return them.

    A temp file of a process that still runs is another writer at work and is left alone.
    """
    removed: list[Path] = []
    try:
        candidates = list(Path(folder).glob(".*.tmp"))
    except OSError:
        return removed
    for tmp in candidates:
        m = _TEMP_PID.match(tmp.name)
        if not m or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
            continue
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def nearest_existing(path: Path) -> Path:
    """`path` itself, or the closest of its parents that exists (what a mkdir would start from)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_writable_dir(folder: Path, what: str, fix: str) -> None:
    """Fail now, before any slow work, when `folder` cannot be created or written to.

    Creates nothing: a command that then fails for another reason leaves no empty folder behind.
    `what` names the folder for the user ("output folder out/"), `fix` says what to do instead.
    """
    from flowercli.errors import FlowerError

    base = nearest_existing(Path(folder))
    if not base.is_dir():
        raise FlowerError(f"cannot write to {what}: {base} is a file, not a folder; {fix}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise FlowerError(f"cannot write to {what}: {base} is not writable; {fix}")


def os_error_text(e: OSError) -> str:
    """An OSError as a short phrase ("No space left on device"), with the advice that fits it."""
    import errno

    text = e.strerror or " ".join(str(e).split())[:200] or type(e).__name__
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return f"{text} (free some space and run it again)"
    return text


def write_error_text(e: OSError) -> str:
    """os_error_text for a failure to create or write `e.filename`.

    Creating an entry in a folder that exists fails with "No such file or directory" where the file
    system makes no new entries (/proc, /sys): that reads like a missing path, so say what it means.
    """
    import errno

    if e.errno == errno.ENOENT and e.filename:
        parent = Path(os.path.abspath(e.filename)).parent
        if parent.is_dir():
            return f"nothing can be created in {parent} (the file system there does not allow it)"
    base = nearest_existing(Path(e.filename)) if e.filename else None
    if e.errno in (errno.ENOTDIR, errno.EEXIST) and base is not None and not base.is_dir():
        return f"{base} is a file, not a folder"
    return os_error_text(e)


@contextlib.contextmanager
def exclusive_lock(path: Path, busy: Exception) -> Iterator[None]:
    """Hold an exclusive advisory lock (flock) on `path` for the block; raise `busy` if another
    process holds it.

    The OS drops the lock when its process dies, even by SIGKILL, so a crash never leaves a stale
    lock to clear by hand. Where there are no locks (Windows; file systems such as some network
    mounts that refuse flock) the block runs unlocked: refusing would stop the work everywhere
    there, for a guard against a second process that is rarely there.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise busy from None
        yield
    finally:
        os.close(fd)  # closing the only descriptor of the open file releases its lock


def run_lock(run_dir: Path):
    """One process per run folder: a second `train` of the same run fails at once."""
    from flowercli.errors import FlowerError

    return exclusive_lock(Path(run_dir) / ".lock", FlowerError(
        f"run {run_dir} is in use by another flowercli process; wait for it or pick another --run"))


class StopFlag:
    """SIGINT/SIGTERM set a flag instead of stopping the process where it is: the loop checks it
    after each step, saves a checkpoint and exits. A second signal stops it at once."""

    def __init__(self):
        self.signum = 0
        # What signal.signal returns and takes back: a Python handler, SIG_DFL/SIG_IGN, or None
        # (a handler set outside Python).
        self._old: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}

    def __enter__(self):
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():  # only there can handlers be set
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum:  # a second Ctrl-C: the user really wants out
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        import signal

        for s, h in self._old.items():
            signal.signal(s, h)
