"""The weight pass's producing threads write their own units: placed shards, written out of order
from several threads, are byte-identical to `save_file`; failures close every file and publish none;
host-byte outputs are checked against the plan; the batched input scales equal the per-module ones."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from quantgate.exporter.schemes import SCHEMES
from quantgate.exporter.schemes.apply import stored_input_scale, stored_input_scales
from quantgate.exporter.writers.shard_plan import OutTensor, Unit, plan_shards
from quantgate.exporter.writers.sharding import HostBytes, ShardWriter, checked_bytes

DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "U8": torch.uint8}


def _units(n: int) -> tuple[list[Unit], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    units, tensors = [], {}
    for i in range(n):
        specs = (OutTensor(f"m{i}.weight", "U8", (8, 4 + i % 3)), OutTensor(f"m{i}.weight_scale_2", "F32", ()),
                 OutTensor(f"m{i}.bias", "BF16", (3,)))
        for s in specs:
            tensors[s.name] = torch.randint(0, 255, s.shape, generator=gen, dtype=torch.uint8) \
                if s.dtype == "U8" else torch.randn(s.shape, generator=gen).to(DTYPES[s.dtype])
        units.append(Unit(tensors=specs, job=i))
    return units, tensors


def test_placed_units_written_out_of_order_by_threads_equal_save_file(tmp_path: Path) -> None:
    units, tensors = _units(24)
    shards = plan_shards(units, 200)
    assert len(shards) > 2
    writer = ShardWriter(tmp_path / "out", sync_every=64)
    (tmp_path / "out").mkdir()
    writer.place(shards)
    held: dict[int, int] = {}
    order = list(reversed(units))          # the last shard's units first: its file opens before the first's
    done = {id(u): threading.Event() for u in units}

    def produce_all(part: list[Unit]) -> None:
        for u in part:
            held[id(u)] = writer.write_unit(u, {t.name: tensors[t.name] for t in u.tensors})
            done[id(u)].set()

    threads = [threading.Thread(target=produce_all, args=(order[k::3],)) for k in range(3)]
    for t in threads:
        t.start()

    def wait(u: Unit) -> int:
        done[id(u)].wait(10)
        return held[id(u)]

    writer.write_placed(shards, wait)
    for t in threads:
        t.join()
    writer.close()
    for shard in shards:
        mine = {t.name: tensors[t.name] for u in shard.units for t in u.tensors}
        save_file(mine, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
        assert (tmp_path / "out" / shard.file).read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert writer.max_buffered_bytes == max(held.values())
    assert not list((tmp_path / "out").glob(".*partial"))


def test_a_failed_unit_closes_every_opened_file_and_publishes_nothing(tmp_path: Path) -> None:
    units, tensors = _units(6)
    shards = plan_shards(units, 150)
    writer = ShardWriter(tmp_path)
    writer.place(shards)
    writer.write_unit(units[-1], {t.name: tensors[t.name] for t in units[-1].tensors})   # a later shard opened

    def produce(u: Unit) -> int:
        if u is units[1]:
            raise RuntimeError("worker failed")
        return writer.write_unit(u, {t.name: tensors[t.name] for t in u.tensors})

    with pytest.raises(RuntimeError, match="worker failed"):
        writer.write_placed(shards, produce)
    writer.close()
    assert not list(tmp_path.glob("*.safetensors"))       # no shard renamed into place
    opened = [p for p in {id(p): p for p in writer._placed.values()}.values() if p.fd is not None]
    assert opened == []
    with pytest.raises(RuntimeError, match="not in a placed shard"):
        ShardWriter(tmp_path).write_unit(units[0], {})


def test_host_bytes_are_checked_against_the_plan() -> None:
    spec = OutTensor("a.weight_scale_2", "F32", ())
    value = np.array([0.5, 2.0], dtype=np.float32)
    assert bytes(checked_bytes(HostBytes.of(value[1:2].reshape(()), "F32"), spec)) == value[1].tobytes()
    with pytest.raises(RuntimeError, match="planned F32"):
        checked_bytes(HostBytes.of(value[1:2].reshape(()), "U8"), spec)
    with pytest.raises(RuntimeError, match="planned F32"):
        checked_bytes(HostBytes.of(value, "F32"), spec)
    with pytest.raises(RuntimeError, match="produced 2 bytes"):
        checked_bytes(HostBytes(memoryview(b"ab"), "F32", ()), spec)


INPUT_FORMS = [(s, f) for s in SCHEMES for f in s.forms if s.numerics_for(f).input_scale is not None]


@pytest.mark.parametrize(("scheme", "form"), INPUT_FORMS, ids=[f"{s.name}-{f.dialect}" for s, f in INPUT_FORMS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numerics", ["modelopt-cuda", "modelopt-cpu"])
def test_batched_input_scales_equal_one_module_at_a_time(scheme, form, dtype, numerics) -> None:
    amaxes = [0.0, 1e-30, 3.4e-5, 0.7853981633974483, 1.0, 2688.0, 448.0 * 3, 6.1e4, 3.3e38]
    for shape in [(), (1,)]:
        suffix, stacked = stored_input_scales(scheme, form, amaxes, dtype, shape, numerics)
        assert tuple(stacked.shape) == (len(amaxes), *shape)
        for a, got in zip(amaxes, stacked):
            want_suffix, want = stored_input_scale(scheme, form, a, dtype, shape, numerics)
            assert suffix == want_suffix and got.dtype == want.dtype
            assert got.reshape(-1).view(torch.uint8).tolist() == want.reshape(-1).view(torch.uint8).tolist(), a
