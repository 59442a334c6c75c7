"""Hostile input never crashes `quantgate validate`: thousands of seeded mutations of safetensors
headers, index files and quantization configs, each ending in exit 0/1 (findings) or 2 (one-line
reason), never an exception. Runs in-process through `quantgate.service.cli.main`; a few cases also run as
real subprocesses to check that no traceback reaches stderr."""

from __future__ import annotations

import json
import random
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import qc_builders as qb

from quantgate.service.cli import main

REPO = Path(__file__).resolve().parents[2]
SEED = 20260521
JUNK: list[object] = [None, True, -1, 0, 2**63, 1e308, float("nan"), "", "x" * 300, "../../etc/passwd", [], {},
                      [[[[["deep"]]]]], {"a": {"b": {"c": []}}}, "F8_E4M3", "NVFP4", [-1, 2], [1e9, 1e9], ["1"]]
DTYPES = ["BF16", "F32", "U8", "F8_E4M3", "F4", "I64", "F8_E8M0", "Q4", "", "bf16", 5]


@pytest.fixture(scope="module")
def base(tiny_model, tmp_path_factory) -> Path:
    """A small sharded ModelOpt NVFP4 MoE checkpoint (index + 2 shards + both config files)."""
    return qb.build(tiny_model("qwen3_moe", layers=1), tmp_path_factory.mktemp("fuzz") / "base", shards=2)


def split_file(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_file(path: Path, header_bytes: bytes, data: bytes, length: int | None = None) -> None:
    path.write_bytes(struct.pack("<Q", len(header_bytes) if length is None else length) + header_bytes + data)


def mutate_header_bytes(rng: random.Random, d: Path) -> None:
    shard = rng.choice(sorted(d.glob("*.safetensors")))
    header, data = split_file(shard)
    raw = bytearray(json.dumps(header).encode())
    for _ in range(rng.randint(1, 6)):
        raw[rng.randrange(len(raw))] = rng.randrange(256)
    join_file(shard, bytes(raw), data, length=rng.choice([None, None, None, rng.randrange(2**40), 0]))


def mutate_header_fields(rng: random.Random, d: Path) -> None:
    shard = rng.choice(sorted(d.glob("*.safetensors")))
    header, data = split_file(shard)
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))
    field = rng.choice(["dtype", "shape", "data_offsets", "drop", "rename", "metadata"])
    if field == "dtype":
        header[name]["dtype"] = rng.choice(DTYPES)
    elif field == "shape":
        header[name]["shape"] = rng.choice([[], [0], [-4], [2**62, 2**62], ["8"], [1.5], header[name]["shape"][::-1]])
    elif field == "data_offsets":
        lo, hi = header[name]["data_offsets"]
        header[name]["data_offsets"] = rng.choice([[hi, lo], [lo, hi + 1], [lo - 1, hi], [0, 2**64], [lo], "x"])
    elif field == "drop":
        del header[name]
    elif field == "rename":
        header[rng.choice(["", ".", "../x", "a" * 5000, name + ".extra", name.replace(".weight", ".weight_scale")])] = \
            header.pop(name)
    else:
        header["__metadata__"] = rng.choice(JUNK)
    join_file(shard, json.dumps(header).encode(), data)


def truncate(rng: random.Random, d: Path) -> None:
    shard = rng.choice(sorted(d.glob("*.safetensors")))
    with open(shard, "r+b") as f:
        f.truncate(rng.randrange(shard.stat().st_size))


def _junk_tree(rng: random.Random, value: object, depth: int = 0) -> object:
    if isinstance(value, dict) and value and depth < 4:
        key = rng.choice(sorted(value))
        value[key] = _junk_tree(rng, value[key], depth + 1) if rng.random() < 0.6 else rng.choice(JUNK)
        return value
    if isinstance(value, list) and value and depth < 4:
        value[rng.randrange(len(value))] = rng.choice(JUNK)
        return value
    return rng.choice(JUNK)


def mutate_json(name: str) -> Callable[[random.Random, Path], None]:
    def mutate(rng: random.Random, d: Path) -> None:
        path = d / name
        if rng.random() < 0.3:
            raw = bytearray(path.read_bytes())
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(len(raw))] = rng.randrange(256)
            path.write_bytes(bytes(raw))
        elif rng.random() < 0.1:
            path.unlink()
        else:
            path.write_text(json.dumps(_junk_tree(rng, json.loads(path.read_text())), allow_nan=True))
    return mutate


def mutate_weight_map(rng: random.Random, d: Path) -> None:
    path = d / qb.INDEX_FILE
    index = json.loads(path.read_text())
    name = rng.choice(sorted(index["weight_map"]))
    index["weight_map"][name] = rng.choice(["/etc/passwd", "../outside.safetensors", "missing.safetensors",
                                            "model.bin", None, 7, "", "a/../b.safetensors"])
    path.write_text(json.dumps(index))


def apply(mutator: Callable[[random.Random, Path], None], rng: random.Random, case: Path) -> None:
    """Run a mutator; one that cannot parse what an earlier mutation already broke is skipped."""
    try:
        mutator(rng, case)
    except (ValueError, KeyError, IndexError, TypeError, struct.error, FileNotFoundError):
        pass


MUTATORS: list[tuple[Callable[[random.Random, Path], None], int]] = [
    (mutate_header_bytes, 500), (mutate_header_fields, 600), (truncate, 150),
    (mutate_json("config.json"), 450), (mutate_json("hf_quant_config.json"), 250),
    (mutate_json(qb.INDEX_FILE), 150), (mutate_weight_map, 150),
]


def test_fuzz_in_process(base: Path, tmp_path: Path, capsys) -> None:
    rng = random.Random(SEED)
    seen: dict[int, int] = {0: 0, 1: 0, 2: 0}
    total = 0
    for mutator, count in MUTATORS:
        for i in range(count):
            case = tmp_path / "case"
            if case.exists():
                shutil.rmtree(case)
            shutil.copytree(base, case)
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                apply(mutator if rng.random() < 0.8 else rng.choice(MUTATORS)[0], rng, case)
            fmt = rng.choice(["json", "text", "markdown", "html"])
            args = ["validate", str(case), "--format", fmt] + (["--no-deep"] if rng.random() < 0.2 else [])
            rc = main(args)       # an escaping exception fails the test with the case in the traceback
            captured = capsys.readouterr()
            assert rc in (0, 1, 2), (mutator.__name__, i, rc)
            if rc == 2:
                assert captured.err.count("\n") == 1 and "Traceback" not in captured.err, captured.err
                assert "internal error" not in captured.err, (mutator.__name__, i, captured.err)
            elif fmt == "json":
                json.loads(captured.out)
            seen[rc] += 1
            total += 1
    assert total >= 2000
    assert seen[1] > 100 and seen[2] > 50, seen      # both findings and unreadable targets were exercised


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_spot_check_subprocess(base: Path, tmp_path: Path, seed: int) -> None:
    rng = random.Random(SEED + seed)
    case = tmp_path / "case"
    shutil.copytree(base, case)
    for mutator, _ in MUTATORS[seed::4]:
        apply(mutator, rng, case)
    proc = subprocess.run([sys.executable, "-m", "quantgate.service.cli", "validate", str(case)], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode in (0, 1, 2)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
