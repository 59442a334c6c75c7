"""Where the weight pass's time goes: the weights-only job with one stage taken out.

    python3 -m benchmarks.weight_pass_probe VARIANT -- quantize SRC --recipe nvfp4 --device cuda \
        --calib-stats STATS --out OUT --overwrite --progress json

Runs `quantgate quantize` in this process after replacing one stage (a measurement, never an
export: the job's validation is expected to fail for `nowrite` / `noread`):

- `base`: unchanged;
- `nowrite`: the shard writer's positioned writes do nothing (files stay sparse);
- `noread`: every source read returns one reused buffer of the right size (no page-cache copy; the
  weight pass's reads go through `DeviceReader.read`, pass-through tensors through `Source._read`);
- `nosync`: no background `fdatasync` while the shard is written (only its final fsync);
- `noprealloc`: shards not reserved when opened (`exporter.writers.preallocate`; the writes extend
  the file, as before 2026-12-03, when this probe's `fallocate` variant measured the reservation the
  writer now makes itself);
- `mmap`: each shard mapped at its planned size; units are copied into the mapping (numpy copies,
  which release the GIL) instead of `pwrite` (one file's buffered writes serialise on its inode lock);
- `buffered`: the source read through page-locked buffers, as before 2026-12-03's reads in place
  (`exporter.device_reads` finds no CUDA runtime to page-lock with);
- `walker`: every unit written by the thread walking the plan, in plan order, not by the thread that
  produced it (`QUANTGATE_WRITES=walker`);
- `prefault`: a side thread faults in the source mappings ahead of the reads (`QUANTGATE_PREFAULT=1`);
- `trace`: unchanged, but timed inside: each batch's production (thread, start, end), each unit's
  write (summed over the threads that write) and the walker's waits for the feed; prints one
  `weight pass trace {...}` line (JSON) at exit: who was busy, and how far production ran ahead of
  the writes (batches produced and GB written by each tenth of the pass), when each step of the
  pass began and how long it took (set-up, the feed, the reader's close, handing the shards' syncs on, the
  index and files), and what the first batches spent reading, quantizing and copying back;
- `warm`: CUDA's context made and the batched quantizer's kernels run once on a small stack before
  the job starts (what the pass pays for first use on a fresh process);
- `a+b`: several of them.

Other knobs are settings of the job itself, e.g. `QUANTGATE_FEED_AHEAD` (batches held ahead of the
walker) and `QUANTGATE_WEIGHT_WORKERS`.

The weight pass's own progress event (GB/s) is printed as the job prints it; compare variants.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    variant, sep, *argv = sys.argv[1:]
    if sep != "--":
        raise SystemExit(__doc__)
    parts = set(variant.split("+"))
    if "walker" in parts:
        os.environ["QUANTGATE_WRITES"] = "walker"
    if "prefault" in parts:
        os.environ["QUANTGATE_PREFAULT"] = "1"
    if "buffered" in parts:
        from quantgate.exporter import device_reads

        device_reads._cudart = lambda: None
    if "nowrite" in parts:
        from quantgate.exporter.writers import sharding

        sharding._pwrite_all = lambda fd, data, offset: None
    if "noprealloc" in parts:
        from quantgate.exporter.writers import sharding

        sharding.preallocate = lambda *args: False
    if "nosync" in parts:
        from quantgate.exporter.writers import sharding

        sharding.ShardWriter.__init__.__kwdefaults__["sync_every"] = 1 << 62
    if "mmap" in parts:
        _mapped_writes()
    if "trace" in parts:
        _traced()
    if "warm" in parts:
        _warm_cuda()
    if "noread" in parts:
        import torch

        from quantgate.exporter.source import TORCH_DTYPES, Source

        buffers: dict[tuple[int, bool], torch.Tensor] = {}

        def reused(self, info, offset, length, pin=False):   # Source._read's signature
            key = (length, pin)
            if key not in buffers:
                buffers[key] = torch.zeros(length, dtype=torch.uint8, pin_memory=pin)
            return buffers[key].view(TORCH_DTYPES[info.dtype])

        Source._read = reused
        from quantgate.exporter.device_reads import DeviceReader

        on_device: dict[tuple[int, str], torch.Tensor] = {}

        def reused_on_device(self, path, offset, length):   # DeviceReader.read's signature
            key = (length, str(self.device))
            if key not in on_device:
                on_device[key] = torch.zeros(length, dtype=torch.uint8, device=self.device)
            return on_device[key]

        DeviceReader.read = reused_on_device
    from quantgate.service.cli import main as cli

    return cli(argv)


def _mapped_writes() -> None:
    import mmap
    import os
    import threading

    import numpy as np

    from quantgate.exporter.writers import sharding

    W = sharding.ShardWriter
    open_fd = W._fd
    maps: dict[int, mmap.mmap] = {}
    lock = threading.Lock()

    def mapped_fd(self, placed):
        if id(placed) in maps:
            return placed.fd
        with lock:
            fd = open_fd(self, placed)   # opened, reserved at its planned size (`_Placed.size`), header written
            if id(placed) not in maps:
                rw = os.open(placed.tmp, os.O_RDWR)   # the writer's fd is write-only; fsync is per inode
                os.ftruncate(rw, placed.size)          # where the filesystem could not reserve it
                maps[id(placed)] = mmap.mmap(rw, placed.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                os.close(rw)
            return fd

    def mapped_write(self, unit, tensors):
        placed = self._placed[id(unit)]
        self._fd(placed)
        target = np.frombuffer(maps[id(placed)], dtype=np.uint8)
        base, held = len(placed.header), 0
        for t in unit.tensors:
            data = sharding.checked_bytes(tensors[t.name], t)
            start = base + placed.offsets[t.name]
            target[start:start + data.nbytes] = np.frombuffer(data, dtype=np.uint8)
            held += data.nbytes
        return held

    W._fd, W.write_unit = mapped_fd, mapped_write


def _warm_cuda() -> None:
    import time

    import torch

    from quantgate.exporter.numerics.nvfp4 import nvfp4_global_scales, quantize_nvfp4

    t = time.perf_counter()
    torch.cuda.init()
    context = time.perf_counter() - t
    weights = torch.randn(4, 256, 512, device="cuda").to(torch.bfloat16)      # [B, out, in]
    scales = nvfp4_global_scales(weights.float().abs().amax(dim=(1, 2)))
    quantize_nvfp4(weights, scales)
    torch.cuda.synchronize()
    print(f"weight pass warm-up: context {context:.3f} s, first quantize {time.perf_counter() - t - context:.3f} s",
          file=sys.stderr, flush=True)


def _traced() -> None:
    import atexit
    import json
    import threading
    import time
    from contextlib import contextmanager

    from quantgate.exporter import pipeline, weight_pass
    from quantgate.exporter.unit_feed import UnitFeed
    from quantgate.exporter.writers import modelopt_batched, sharding

    now = time.perf_counter
    produced: list[tuple[str, float, float]] = []    # (thread, start, end) per batch
    written: list[tuple[float, float, int]] = []      # (start, end, bytes) per unit
    waits: list[float] = []
    steps: list[tuple[str, float, float]] = []        # (step, start, end) of the pass's own steps
    inner: dict[str, list[tuple[float, float]]] = {}  # first calls of a batch's parts: read, quantize, to host
    run, get, write_unit = UnitFeed._run, UnitFeed.get, sharding.ShardWriter.write_unit

    def timed_run(self, k):
        t0 = now()
        out = run(self, k)
        produced.append((threading.current_thread().name, t0, now()))
        return out

    def timed_get(self, unit):
        t0 = now()
        out = get(self, unit)
        waits.append(now() - t0)
        return out

    def timed_write(self, unit, tensors):
        t0 = now()
        held = write_unit(self, unit, tensors)
        written.append((t0, now(), held))
        return held

    UnitFeed._run, UnitFeed.get, sharding.ShardWriter.write_unit = timed_run, timed_get, timed_write

    def step(name, fn):
        def timed(*args, **kwargs):
            t0 = now()
            try:
                return fn(*args, **kwargs)
            finally:
                steps.append((name, t0, now()))
        return timed

    def first_calls(name, fn, keep=6):
        def timed(*args, **kwargs):
            t0 = now()
            try:
                return fn(*args, **kwargs)
            finally:
                calls = inner.setdefault(name, [])
                if len(calls) < keep:
                    calls.append((t0, now()))
        return timed

    reader_cm = weight_pass.device_reader

    @contextmanager
    def timed_reader(device):
        t0 = now()
        with reader_cm(device) as reader:
            steps.append(("reader_open", t0, now()))
            try:
                yield reader
            finally:
                t1 = now()
        steps.append(("reader_close", t1, now()))

    for name in ("plan_shards", "feed_batching", "copy_other_files", "write_json_atomic"):
        setattr(weight_pass, name, step(name, getattr(weight_pass, name)))
    weight_pass.device_reader = timed_reader
    sharding.ShardWriter.place = step("place", sharding.ShardWriter.place)
    sharding.ShardWriter.detach = step("detach", sharding.ShardWriter.detach)
    pipeline.write_export = step("write_export", pipeline.write_export)
    modelopt_batched.read_groups = first_calls("read", modelopt_batched.read_groups)
    modelopt_batched.quantize_nvfp4 = first_calls("quantize", modelopt_batched.quantize_nvfp4)
    modelopt_batched._to_host = first_calls("to_host", modelopt_batched._to_host, keep=12)

    def summary() -> None:
        if not produced or not written:
            return
        entry = min((t for name, t, _ in steps if name == "write_export"), default=None)
        start = min(t for _, t, _ in produced)
        end = max(e for _, e, _ in written)
        origin = entry if entry is not None else start
        threads: dict[str, float] = {}
        for name, t0, t1 in produced:
            threads[name] = threads.get(name, 0.0) + t1 - t0
        write_s = sum(e - t for t, e, _ in written)
        nbytes = sum(b for _, _, b in written)
        tenths = [round(start + (end - start) * i / 10, 6) for i in range(1, 11)]
        out = {
            "span_s": round(end - start, 3),
            "production_end_s": round(max(e for _, _, e in produced) - start, 3),
            "batches": len(produced),
            "batch_mean_s": round(sum(e - t for _, t, e in produced) / len(produced), 4),
            "producer_busy_s": {k: round(v, 3) for k, v in sorted(threads.items())},
            "write_s": round(write_s, 3),
            "walker_wait_s": round(sum(waits), 3),
            "write_gb_per_s_while_writing": round(nbytes / write_s / 1e9, 2) if write_s else None,
            "produced_by_tenth": [sum(1 for _, _, e in produced if e <= t) for t in tenths],
            "written_gb_by_tenth": [round(sum(b for _, e, b in written if e <= t) / 1e9, 2) for t in tenths],
            # seconds from the pass's entry: [start, duration]
            "steps": [[name, round(t0 - origin, 3), round(t1 - t0, 3)] for name, t0, t1 in sorted(steps, key=lambda s: s[1])],
            "first_batches": [[round(t0 - origin, 3), round(t1 - t0, 3)] for _, t0, t1 in sorted(produced, key=lambda p: p[1])[:4]],
            "first_calls": {name: [[round(t0 - origin, 3), round(t1 - t0, 4)] for t0, t1 in calls]
                            for name, calls in inner.items()},
            "last_write_end_s": round(end - origin, 3),
        }
        print("weight pass trace " + json.dumps(out), file=sys.stderr, flush=True)

    atexit.register(summary)


if __name__ == "__main__":
    sys.exit(main())
