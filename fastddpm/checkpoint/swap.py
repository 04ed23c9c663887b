"""The atomic swap: a checkpoint folder is replaced whole, never left half written.

Writing (:func:`replace_folder`). The new checkpoint is written into a sibling folder
``<name>.tmp-<host>-<pid>-<random>``; each file, then the folder, is fsynced. It is then swapped in:

* where the kernel and file system offer it (Linux >= 3.15 on ext4, xfs, btrfs, tmpfs, ...), one
  ``renameat2(RENAME_EXCHANGE)`` exchanges the new folder and the old one atomically; the old one,
  now under the temporary name, is deleted;
* elsewhere, the old folder is renamed to ``<name>.old-<host>-<pid>-<random>`` and the new one to
  ``<name>``; if that second rename raises, the old folder is renamed back before the error
  propagates. The old folder is deleted last.

The parent folder is fsynced after the swap. The guarantee: once a checkpoint exists at ``path``,
every later read of ``path`` finds a complete checkpoint, the previous one or the new one and
never a mixture, whatever happens to the writer (an exception, ENOSPC, SIGKILL); the one exception
is the fallback swap killed between its two renames, which leaves ``path`` missing and both
complete checkpoints beside it, and then the first :func:`~fastddpm.checkpoint.read_checkpoint`
(``fastddpm.load``, ``train(resume=True)``) moves the newer complete one back
(:mod:`fastddpm.checkpoint.recovery`). Writers of one path must not run concurrently.

Leftovers (:func:`remove_abandoned_temporaries`). A writer killed mid-write leaves its temporary
folder. Before each write, the temporaries of the same path whose writer is this host's process
that no longer runs (its pid is in the name) are deleted; a running process's temporaries, and
those of other hosts or of older fastddpm versions, are never touched.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import threading
from typing import Callable, Optional, Tuple

TEMP_KINDS = ("tmp", "old")

# ----------------------------------------------------------------------- temporary folders
# The host goes into temporary names so that a folder shared between machines never has one
# machine decide that another machine's writer is dead; '-' separates the name's fields.
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "localhost"
# This process's temporaries being written now (a thread may write while another cleans up).
_IN_FLIGHT: set = set()
_IN_FLIGHT_LOCK = threading.Lock()


def _temp_prefix(name: str, kind: str) -> str:
    return f"{name}.{kind}-{_HOST}-{os.getpid()}-"


def _is_temp_of(entry: str, name: str) -> bool:
    return any(entry.startswith(f"{name}.{kind}-") for kind in TEMP_KINDS)


def _writer_of(entry: str, name: str) -> Optional[Tuple[str, int]]:
    """``(host, pid)`` encoded in the temporary ``entry`` of checkpoint ``name``; None for a name
    this version does not make (an older fastddpm's ``mkdtemp`` name)."""
    for kind in TEMP_KINDS:
        prefix = f"{name}.{kind}-"
        if entry.startswith(prefix):
            parts = entry[len(prefix):].split("-")
            if len(parts) == 3 and parts[1].isdigit() and 0 < int(parts[1]) < 2 ** 31:
                return parts[0], int(parts[1])
    return None


def _pid_running(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a zombie does not: it writes nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's process, alive
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (not Linux): kill(pid, 0) is all there is to know
        return True


def writer_running(temp: str, name: str) -> Optional[bool]:
    """True when a running writer owns the temporary folder ``temp``, False when its writer is
    gone, None when that cannot be known (another host's folder, an older version's name)."""
    writer = _writer_of(os.path.basename(temp), name)
    if writer is None or writer[0] != _HOST:
        return None
    if writer[1] == os.getpid():
        with _IN_FLIGHT_LOCK:
            return temp in _IN_FLIGHT
    return _pid_running(writer[1])


def temporaries(parent: str, name: str):
    """The temporary sibling folders of checkpoint ``name`` in ``parent`` (full paths)."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return []
    return [e.path for e in entries if _is_temp_of(e.name, name) and e.is_dir(follow_symlinks=False)]


def remove_abandoned_temporaries(path: str) -> list:
    """Delete the temporary siblings of the checkpoint ``path`` left by writers of this host that no
    longer run; returns the folders deleted. A running writer's folder is never touched."""
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    gone = [t for t in temporaries(parent, name) if writer_running(t, name) is False]
    for temp in gone:
        shutil.rmtree(temp, ignore_errors=True)
    return gone


# ------------------------------------------------------------------------------ durability
def fsync_dir(path: str):
    """Make the entries of folder ``path`` (a rename into it) durable; a no-op where folders
    cannot be opened (Windows) or fsynced (some network file systems)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _make_readable(directory: str):
    """Give the directory and its files the permissions of ordinary new files (mkdtemp uses 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)


# ------------------------------------------------------------------------------------ swap
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# errnos by which renameat2 says "not here" (old kernel or libc, file system without the flag)
_EXCHANGE_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


@functools.lru_cache(maxsize=None)
def _renameat2():
    """libc's ``renameat2`` (glibc >= 2.28), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: str, b: str) -> bool:
    """Atomically exchange the existing entries ``a`` and ``b``; False where that is unavailable."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in _EXCHANGE_UNSUPPORTED:
        return False
    raise OSError(err, os.strerror(err), a, None, b)


def _install(new: str, path: str) -> Optional[str]:
    """Put the complete folder ``new`` at ``path``; returns the folder that now holds the replaced
    checkpoint (for the caller to delete), or None when there was none."""
    parent, name = os.path.split(path)
    if not os.path.lexists(path):
        os.rename(new, path)
        replaced = None
    elif _exchange(new, path):
        replaced = new
    else:
        replaced = os.path.join(parent, _temp_prefix(name, "old") + secrets.token_hex(4))
        os.rename(path, replaced)
        try:
            os.rename(new, path)
        except BaseException:
            os.rename(replaced, path)  # the previous checkpoint goes back before the error propagates
            raise
    fsync_dir(parent)
    return replaced


def replace_folder(path: str, fill: Callable[[str], None]):
    """Replace the folder at the absolute ``path`` (or create it) by the one that ``fill(folder)``
    writes into a new temporary sibling, swapped in whole (the module docstring's guarantee).

    ``fill`` writes and fsyncs the files; the folder then gets the permissions of ordinary new
    files and is fsynced before the swap. An exception from ``fill`` or the swap leaves ``path`` as
    it was and deletes the temporary folder before it propagates."""
    parent, name = os.path.split(path)
    tmp = tempfile.mkdtemp(prefix=_temp_prefix(name, "tmp"), dir=parent)
    with _IN_FLIGHT_LOCK:
        _IN_FLIGHT.add(tmp)
    try:
        fill(tmp)
        _make_readable(tmp)
        fsync_dir(tmp)
        replaced = _install(tmp, path)
    except BaseException:
        # tmp holds the unfinished new checkpoint, or nothing: the previous one is at path
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT.discard(tmp)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
