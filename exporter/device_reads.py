"""Source bytes to a GPU without a host copy: the GPU weight pass's reads.

Reading each weight into a page-locked buffer and copying that to the device costs a CPU copy of
every source byte (10.7 GB for the issue model): py-spy on the H200 put 30-37 % of each producing
thread in those reads. Here a source file is mapped read-only, the whole pages of a span are
page-locked in place (`cudaHostRegister(..., cudaHostRegisterReadOnly)`: the page cache's own
pages) and the GPU's copy engine reads them directly; the span is unlocked once the copy is done.
`benchmarks/read_bench.py` measured 20 GB/s on one thread this way against 6 GB/s through a
page-locked buffer (BENCHMARKS.md, issue 11).

Only a span's whole pages are registered; the partial pages at either end (under one page each) go
through a small page-locked buffer, so threads reading adjacent spans never register the same page
(a second registration of a page fails). Where registration is not possible (a driver without
read-only registration, no CUDA runtime library to call, a filesystem the driver refuses) the
reader logs once and reads through page-locked buffers, as before: the bytes are the same either
way. Linux only (the mapping is made with libc's `mmap`); elsewhere every read takes that path.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch

from quantgate.exporter.switches import OFF, switch
from quantgate.validators.errors import CheckpointReadError

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
HOST_REGISTER_READ_ONLY = 0x08           # cudaHostRegisterReadOnly: the device only reads these pages
MIN_REGISTERED = 1 << 20                 # bytes: shorter spans are cheaper through a page-locked buffer
ALREADY_REGISTERED = 712                 # cudaErrorHostMemoryAlreadyRegistered: another thread holds these pages
MADV_POPULATE_READ = 22                  # Linux >= 5.14: fault in a range's page-table entries (readable)
PREFAULT_STEP = 64 << 20                 # bytes populated per madvise call (the side thread checks for close between)
PREFAULT_AHEAD = 1 << 30                 # bytes of a file faulted in beyond the furthest read of it (a cold file
                                         # larger than memory must not be read far ahead of its readers)
#: On (default) a side thread faults in each mapped source file ahead of the reads, so page-locking a
#: span finds its page-table entries present instead of faulting them in on the reading thread; "0"
#: turns it off. H200: the weight pass alone 2-12 % faster in 3 paired runs, but inside jobs (with
#: the walker's writes) within the run-to-run noise (BENCHMARKS.md, issue 11, fifth session).
PREFAULT_ENV = "QUANTGATE_PREFAULT"
_MAP_FAILED = ctypes.c_void_p(-1).value


class DeviceReader:
    """`read(path, offset, length)`: those bytes of a file as a uint8 tensor on `device`, copied on the
    calling thread's current stream (work queued after it on that stream sees them; page-locked
    pages are unlocked only once their copy is done). Thread-safe; `close()` unmaps."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._lock = threading.Lock()
        self._maps: dict[Path, tuple[int, int]] = {}       # file -> (address, size) of its read-only mapping
        self._fds: dict[Path, int] = {}
        self._libc = _libc()
        self._cudart = _cudart() if device.type == "cuda" and self._libc is not None else None
        self.registered_bytes = 0
        self.buffered_bytes = 0
        self._prefault = switch(PREFAULT_ENV) != OFF and self._cudart is not None
        self._prefaulter: ThreadPoolExecutor | None = None
        self._closing = False
        self._progress = threading.Condition(self._lock)   # a read went further, a file was mapped, or close
        self._read_to: dict[int, int] = {}                 # mapping address -> furthest byte read of it
        self._last_mapped = 0                              # the address of the file mapped last
        if device.type == "cuda" and self._cudart is None:
            log.info("weight pass: no CUDA runtime or libc to page-lock the source in place; reading through "
                     "page-locked buffers")

    def read(self, path: Path, offset: int, length: int) -> torch.Tensor:
        first = -(-offset // PAGE) * PAGE                      # the span's whole pages: [first, last)
        last = (offset + length) // PAGE * PAGE
        cudart = self._cudart                                  # another thread may turn page-locking off
        base = self._address(path) if cudart is not None and last - first >= MIN_REGISTERED else None
        address = base + first if base is not None else 0
        if base is not None and self._prefault:
            with self._progress:
                self._read_to[base] = max(self._read_to.get(base, 0), offset + length)
                self._progress.notify_all()
        if base is None or not self._register(cudart, address, last - first):
            self._count(0, length)                             # on the CPU: the buffer itself, no copy
            return self._buffered(path, offset, length).to(self.device, non_blocking=True)
        out = torch.empty(length, dtype=torch.uint8, device=self.device)
        try:
            host = torch.frombuffer((ctypes.c_ubyte * (last - first)).from_address(address), dtype=torch.uint8)
            if first > offset:
                out[:first - offset].copy_(self._buffered(path, offset, first - offset), non_blocking=True)
            out[first - offset:last - offset].copy_(host, non_blocking=True)
            if last < offset + length:
                out[last - offset:].copy_(self._buffered(path, last, offset + length - last), non_blocking=True)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()   # the copy engine is done with the pages
        finally:
            cudart.cudaHostUnregister(ctypes.c_void_p(address))
        self._count(last - first, length - (last - first))
        return out

    def close(self) -> None:
        with self._progress:
            self._closing = True
            self._progress.notify_all()
        if self._prefaulter is not None:   # no madvise may run on a range being unmapped
            self._prefaulter.shutdown(wait=True)
            self._prefaulter = None
        with self._lock:
            for address, size in self._maps.values():
                self._libc.munmap(ctypes.c_void_p(address), ctypes.c_size_t(size))
            for fd in self._fds.values():
                os.close(fd)
            self._maps.clear()
            self._fds.clear()

    # -- internals -------------------------------------------------------------------------------
    def _count(self, registered: int, buffered: int) -> None:
        with self._lock:
            self.registered_bytes += registered
            self.buffered_bytes += buffered

    def _register(self, cudart: ctypes.CDLL, address: int, size: int) -> bool:
        code = cudart.cudaHostRegister(ctypes.c_void_p(address), ctypes.c_size_t(size),
                                       ctypes.c_uint(HOST_REGISTER_READ_ONLY))
        if code == 0:
            return True
        cudart.cudaGetLastError()         # the runtime keeps the error for the thread's next call: clear it
        if code == ALREADY_REGISTERED:    # the same bytes read twice at once: this read goes through a buffer
            return False
        self._turn_off(f"cudaHostRegister error {code}")
        return False

    def _turn_off(self, why: str) -> None:
        with self._lock:
            if self._cudart is not None:
                log.warning("weight pass: cannot page-lock the source in place (%s); reading through "
                            "page-locked buffers", why)
            self._cudart = None

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd

    def _address(self, path: Path) -> int | None:
        """Where `path` is mapped read-only (mapped on first use); None, with page-locking turned off,
        where it cannot be mapped (some FUSE and network filesystems)."""
        mapped = self._maps.get(path)
        if mapped is None:
            fd = self._fd(path)
            with self._lock:
                mapped = self._maps.get(path)
                if mapped is None:
                    size = os.fstat(fd).st_size
                    address = self._libc.mmap(None, ctypes.c_size_t(size), mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
                    if address in (None, _MAP_FAILED):
                        code = ctypes.get_errno()
                        why = f"cannot map {path.name}: {os.strerror(code)}"
                    else:
                        mapped = self._maps[path] = (address, size)
                        self._last_mapped = address
                        self._progress.notify_all()
                        if self._prefault:
                            if self._prefaulter is None:
                                self._prefaulter = ThreadPoolExecutor(1, thread_name_prefix="quantgate-prefault")
                            self._prefaulter.submit(self._populate, address, size)
            if mapped is None:
                self._turn_off(why)
                return None
        return mapped[0]

    def _populate(self, address: int, size: int) -> None:
        """Fault in a mapped file's page-table entries from its start, a step at a time, at most
        `PREFAULT_AHEAD` beyond its furthest read; until done, closed, the readers have moved on to a
        file mapped after it, or the kernel says it cannot (before Linux 5.14): an optimisation, never
        an error."""
        for start in range(0, size, PREFAULT_STEP):
            with self._progress:
                self._progress.wait_for(lambda start=start: self._closing or self._last_mapped != address
                                        or start < self._read_to.get(address, 0) + PREFAULT_AHEAD)
                if self._closing or self._last_mapped != address:
                    return
            length = min(PREFAULT_STEP, size - start)
            if self._libc.madvise(ctypes.c_void_p(address + start), ctypes.c_size_t(length), MADV_POPULATE_READ):
                log.debug("weight pass: prefaulting the source stopped: %s", os.strerror(ctypes.get_errno()))
                return

    def _buffered(self, path: Path, offset: int, length: int) -> torch.Tensor:
        """The bytes read into a page-locked buffer (the copy from it can run asynchronously)."""
        buf = torch.empty(length, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        view = memoryview(buf.numpy())
        fd, got = self._fd(path), 0
        while got < length:
            n = os.preadv(fd, [view[got:]], offset + got)
            if n == 0:
                raise CheckpointReadError(f"{path}: truncated: it ends before byte {offset + length}, which its "
                                          "header promises; re-download or re-save the checkpoint")
            got += n
        return buf


@contextmanager
def device_reader(device: torch.device) -> Iterator[DeviceReader]:
    reader = DeviceReader(device)
    try:
        yield reader
    finally:
        reader.close()


def _libc() -> ctypes.CDLL | None:
    """libc with `mmap`/`munmap` typed for 64-bit offsets, or None off Linux."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int64]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError, TypeError):
        return None
    return libc if os.name == "posix" else None


def _cudart() -> ctypes.CDLL | None:
    """The CUDA runtime library torch loaded (the same instance, so errors cleared here are the ones
    torch would see), found in this process's mappings; None where there is none to find."""
    try:
        torch.cuda.init()
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
    except (OSError, RuntimeError):
        return None
    for path in runtimes_first(paths, torch.version.cuda):
        try:
            lib = ctypes.CDLL(path)
            lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
            lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
            lib.cudaGetLastError.argtypes = []
            return lib
        except (OSError, AttributeError):
            continue
    return None


def runtimes_first(paths: set[str], cuda_version: str | None) -> list[str]:
    """The CUDA runtime libraries mapped in this process, the one of torch's CUDA major version first."""
    mine = f"libcudart.so.{(cuda_version or '').split('.')[0]}"
    return sorted(paths, key=lambda path: (mine not in path, path))
