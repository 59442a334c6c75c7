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
- `a+b`: several of them.

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


if __name__ == "__main__":
    sys.exit(main())
