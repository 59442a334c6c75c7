"""What bounds the weight pass's writes: positioned writes of fresh file bytes, by thread count.

    python3 -m benchmarks.write_bench DIR [--gib 2] [--chunk-mib 2] [--threads 1,2,4]

Writes `gib` GiB in `chunk` pieces (the size of one expert's NVFP4 weight) with `os.pwrite`, as the
shard writer does, from 1..N threads into one file (the writer's case: every unit of a shard goes to
one file) and into one file per thread; prints GB/s per case as JSON. Buffered: no fsync.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path


def _run(directory: Path, total: int, chunk: int, threads: int, one_file: bool) -> float:
    data = memoryview(os.urandom(chunk))
    paths = [directory / f"write_bench_{i}.bin" for i in range(1 if one_file else threads)]
    fds = [os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644) for p in paths]

    def writer(t: int) -> None:
        fd = fds[0 if one_file else t]
        for offset in range(t * chunk, total, chunk * threads):
            os.pwrite(fd, data, offset if one_file else offset // threads)

    start = time.perf_counter()
    pool = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    seconds = time.perf_counter() - start
    for fd, path in zip(fds, paths):
        os.close(fd)
        path.unlink()
    return total / seconds / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("directory", type=Path)
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--chunk-mib", type=float, default=2.0)
    p.add_argument("--threads", default="1,2,4")
    args = p.parse_args()
    total, chunk = int(args.gib * 2**30), int(args.chunk_mib * 2**20)
    out: dict[str, float] = {}
    _run(args.directory, total, chunk, 1, True)   # warm-up, not reported (the first pass runs slower)
    for threads in (int(t) for t in args.threads.split(",")):
        for one_file in (True, False):
            out[f"{threads} threads, {'one file' if one_file else 'a file each'}"] = round(
                _run(args.directory, total, chunk, threads, one_file), 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
