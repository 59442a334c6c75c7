"""What bounds the weight pass's reading: page-cached safetensors into host buffers, by thread count.

    python3 -m benchmarks.read_bench SRC_DIR [--chunk-mib 8] [--threads 1,2,4,8] [--cuda]


Reads every `*.safetensors` file of SRC_DIR (page-cached first) in `chunk` pieces with positioned
reads, as `exporter.source.Source._read` does, into (a) fresh pageable buffers, and with `--cuda`
(b) page-locked buffers reused per thread and (c) those then copied to the GPU, and (d) without a
host copy: the file mapped read-only, each piece page-locked in place (`cudaHostRegister`) and copied
to the GPU from the page cache; prints GB/s per mode and thread count as JSON.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch


def _pieces(files: list[Path], chunk: int) -> list[tuple[Path, int, int]]:
    out = []
    for f in files:
        size = f.stat().st_size
        out += [(f, off, min(chunk, size - off)) for off in range(0, size, chunk)]
    return out


def _run(pieces: list[tuple[Path, int, int]], threads: int, mode: str, chunk: int) -> float:
    fds = {f: os.open(f, os.O_RDONLY) for f in {p[0] for p in pieces}}
    per_thread: dict[int, torch.Tensor] = {}

    def buffer() -> torch.Tensor:
        key = threading.get_ident()
        if mode == "pageable":
            return torch.empty(chunk, dtype=torch.uint8)
        if key not in per_thread:
            per_thread[key] = torch.empty(chunk, dtype=torch.uint8, pin_memory=True)
        return per_thread[key]

    maps = {f: mmap.mmap(fd, 0, prot=mmap.PROT_READ) for f, fd in fds.items()} if mode == "registered+h2d" else {}

    def read(piece: tuple[Path, int, int]) -> int:
        f, off, n = piece
        if mode == "registered+h2d":   # no host copy: the page-cache pages themselves, page-locked for the DMA
            return _registered_h2d(maps[f], off, n)
        buf = buffer()
        view = memoryview(buf.numpy())[:n]
        got = 0
        while got < n:
            got += os.preadv(fds[f], [view[got:]], off + got)
        if mode == "pinned+h2d":
            stream = torch.cuda.current_stream()
            buf[:n].to("cuda", non_blocking=True)
            stream.synchronize()
        return n

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read, pieces))
    seconds = time.perf_counter() - start
    for m in maps.values():
        m.close()
    for fd in fds.values():
        os.close(fd)
    return total / 1e9 / seconds


#: cudaHostRegisterReadOnly: the driver may map the pages for device reads only (a read-only file mapping).
HOST_REGISTER_READ_ONLY = 0x08


def _registered_h2d(mapping: mmap.mmap, off: int, n: int) -> int:
    """Page-lock `n` bytes of a read-only file mapping in place, copy them to the GPU, unlock."""
    with warnings.catch_warnings():   # a read-only buffer: torch warns that writes would be undefined
        warnings.simplefilter("ignore")
        host = torch.frombuffer(mapping, dtype=torch.uint8, count=n, offset=off)
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(host.data_ptr(), n, HOST_REGISTER_READ_ONLY)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister failed: {err}")
    try:
        host.to("cuda", non_blocking=True)
        torch.cuda.current_stream().synchronize()
    finally:
        cudart.cudaHostUnregister(host.data_ptr())
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src")
    p.add_argument("--chunk-mib", type=int, default=8)
    p.add_argument("--threads", default="1,2,4,8")
    p.add_argument("--cuda", action="store_true")
    args = p.parse_args(argv)
    files = sorted(Path(args.src).glob("*.safetensors"))
    chunk = args.chunk_mib * 2**20
    pieces = _pieces(files, chunk)
    _run(pieces, 8, "pageable", chunk)   # page-cache everything once
    modes = ["pageable"] + (["pinned", "pinned+h2d", "registered+h2d"] if args.cuda else [])   # page-locking needs CUDA
    res = {"bytes": sum(f.stat().st_size for f in files), "chunk_mib": args.chunk_mib,
           "gb_per_s": {m: {t: round(_run(pieces, int(t), m, chunk), 2) for t in args.threads.split(",")}
                        for m in modes}}
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
