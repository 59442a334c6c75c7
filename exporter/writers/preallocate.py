"""Reserving an export's disk space before its bytes are written.

Every shard's size is known when it is planned (`sharding.ShardWriter.place`), so the writer can ask
the filesystem for all of its blocks when the file is opened. Two gains:

- a full disk or quota fails at once, with the shard named and the space needed, instead of after
  minutes of loading and calibrating, in the middle of a shard;
- the weight pass writes faster: the producing threads' positioned writes land in allocated blocks
  instead of extending the file (measured on the H200 machine: 10-20 % less weight-pass time,
  BENCHMARKS.md "issue 11").

`fallocate(2)` is called directly (mode 0) rather than through `posix_fallocate`: where a filesystem
cannot reserve space, glibc's `posix_fallocate` emulates it by writing a byte into every block, which
costs more than it saves; there, and off Linux, nothing is reserved and the writes extend the file
as before. Pure functions of a file descriptor and a size; no torch.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from quantgate.validators.errors import QuantgateError

log = logging.getLogger(__name__)

#: errno values meaning "this filesystem (or kernel) cannot reserve space": write without reserving.
UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})
#: errno values meaning "there is not room for this file".
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class OutputSpaceError(QuantgateError):
    """The export's directory has no room for what the plan will write."""


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's `fallocate(fd, mode, offset, len)` with 64-bit offsets, or None (not Linux / not found)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError, TypeError):   # no libc to open (not POSIX), or no fallocate in it
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return func


_FALLOCATE = _load_fallocate()


def _size(nbytes: int) -> str:
    """Bytes for a message: "3.00 GB", "412.5 kB" (decimal units, as `df -H` and the Hub show them)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}" if unit == "GB" else f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def preallocate(fd: int, size: int, name: str, where: Path) -> bool:
    """Reserve `size` bytes of blocks for the open file `fd` (its apparent size becomes `size`).

    Returns False where the filesystem or platform cannot reserve (nothing changed). Raises
    `OutputSpaceError` when there is no room, naming the file (`name`) and the directory the user
    chose (`where`, on the same filesystem); any other failure as `OSError`.
    """
    if size <= 0 or _FALLOCATE is None:
        return False
    while True:
        if _FALLOCATE(fd, 0, 0, size) == 0:
            return True
        code = ctypes.get_errno()
        if code == errno.EINTR:
            continue
        if code in UNSUPPORTED:
            log.debug("%s: the filesystem cannot reserve space (%s); writing without", name, os.strerror(code))
            return False
        if code in NO_ROOM:
            raise OutputSpaceError(
                f"no room for shard {name} ({_size(size)}) on the filesystem of {where}: {os.strerror(code)}; "
                "free space there or write the export elsewhere (--out, or the service's output root)")
        raise OSError(code, os.strerror(code), name)


def check_free_space(directory: Path, needed: int) -> None:
    """Fail before anything is written when `directory`'s filesystem has fewer than `needed` bytes
    free for this user (quotas and a filesystem's own overhead can still stop the writes later:
    `preallocate` catches those per shard)."""
    usage = shutil.disk_usage(directory)
    if usage.total == 0:   # the filesystem reports no sizes (some FUSE mounts): nothing to judge by
        return
    free = usage.free
    if needed > free:
        raise OutputSpaceError(
            f"the export needs {_size(needed)} of shards but {directory} has {_size(free)} free; "
            "free space there or write the export elsewhere (--out, or the service's output root)")
