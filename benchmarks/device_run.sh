#!/bin/bash
# One device call: ModelOpt fixtures, their tests on CUDA, side-by-side runs. Run from the repo root
# of a copy that holds .whl/ (ModelOpt 0.47 and its dependencies) and this tree under .gpuwork/.
# Usage: bash .gpuwork/benchmarks/device_run.sh STEPS...   (steps: see the case list below)
set -u
ROOT=$(pwd)
VARIANTS=${VARIANTS:-}   # e.g. "--variant late:QUANTGATE_OVERLAP_START=imports"
OUT=${OUT:-/tmp/out}
LOG=$OUT/run.log
CALIB=/tmp/sbs/calib/calibration.json   # the build step's calibration, for the weights-only steps (not under a timed run's --out)
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/mo .whl/*.whl >>$LOG 2>&1 || exit 1
cd .gpuwork
# quantgate.* straight from this source tree, without installing it: a namespace folder of links
SRC=/tmp/qgsrc
mkdir -p $SRC/quantgate && for pkg in service exporter validators; do ln -sfn "$PWD/$pkg" "$SRC/quantgate/$pkg"; done
export PYTHONPATH=$SRC
nvidia-smi -L >>$LOG 2>&1
for step in "$@"; do
  echo "=== $step $(date -u +%T)" >>$LOG
  case $step in
    fixtures)
      PYTHONPATH=/tmp/mo:$SRC:. python3 -m benchmarks.modelopt_fixtures --out tests/exporter/fixtures/modelopt_cuda >>$LOG 2>&1
      tar -cf $OUT/fx.tar -C tests/exporter/fixtures modelopt_cuda ;;
    tests)
      PYTHONPATH=$SRC:. python3 -m pytest tests/exporter/test_modelopt_cuda_fixtures.py tests/exporter/test_numerics_nvfp4.py \
        tests/exporter/test_numerics_fp8.py tests/exporter/test_modelopt_batched.py -q -p no:cacheprovider >$OUT/pytest.log 2>&1 ;;
    quicktests)   # the device reader (real registration, prefaulting), the walker's writes, the calibration process
      QUANTGATE_TEST_DEVICE=cuda PYTHONPATH=$SRC:. python3 -m pytest tests/exporter/test_device_reads.py \
        tests/exporter/test_overlap.py tests/exporter/test_calibration_process.py tests/exporter/test_device_warmup.py tests/exporter/test_durability.py -k "prefault or page_cache or walking or byte_identical or killed or warmup or sync or publish" \
        -q -p no:cacheprovider >$OUT/pytest_quick.log 2>&1 ;;
    small_fp8)
      python3 -m benchmarks.modelopt_side_by_side --work /tmp/sbs --modelopt-path /tmp/mo --small --recipe fp8 \
        --cpu-check --json $OUT/sbs_small_fp8.json >>$LOG 2>&1 ;;
    small_nvfp4)
      python3 -m benchmarks.modelopt_side_by_side --work /tmp/sbs --modelopt-path /tmp/mo --small --recipe nvfp4 \
        --cpu-check --json $OUT/sbs_small_nvfp4.json >>$LOG 2>&1 ;;
    issue_nvfp4)
      python3 -m benchmarks.modelopt_side_by_side --work /tmp/sbs --modelopt-path /tmp/mo --recipe nvfp4 \
        --cpu-check --json $OUT/sbs_issue_nvfp4.json >>$LOG 2>&1 ;;
    issue_overlap)   # the issue model; quantgate with the overlap (default on CUDA) and without; no CPU run; ROUNDS=N
      for r in $(seq ${ROUNDS:-1}); do
        python3 -m benchmarks.modelopt_side_by_side --work /tmp/sbs --modelopt-path /tmp/mo --recipe nvfp4 \
          --serial-too $VARIANTS --json $OUT/sbs_issue_overlap_$r.json >>$LOG 2>&1
      done ;;
    overlap_tests)   # the overlap's byte identity on CUDA, and the batched GPU writer
      QUANTGATE_TEST_DEVICE=cuda PYTHONPATH=$SRC:. python3 -m pytest tests/exporter/test_overlap.py tests/exporter/test_device_reads.py \
        tests/exporter/test_modelopt_batched.py tests/exporter/test_calibration_process.py -q -p no:cacheprovider >$OUT/pytest_overlap.log 2>&1 ;;
    readbench)   # what bounds the weight pass's reads: GB/s by thread count, pageable / pinned / pinned + H2D
      for c in ${READ_CHUNKS:-8}; do PYTHONPATH=$SRC:. python3 -m benchmarks.read_bench /tmp/sbs/issue/src --cuda \
        --chunk-mib $c --threads ${READ_THREADS:-1,2,4,8} >>$OUT/read_bench.json 2>&1; done ;;
    wp)   # the weight pass alone (a calibration file as stats), by worker count: GB/s of BF16 read
      STATS=/tmp/sbs/issue/nvfp4/modelopt_amax_stats.json; [ -f $STATS ] || STATS=$CALIB
      for w in ${WP_WORKERS:-1 2 4}; do
        echo "workers=$w $(QUANTGATE_WEIGHT_WORKERS=$w PYTHONPATH=$SRC:. python3 -m quantgate.service.cli quantize \
          /tmp/sbs/issue/src --recipe nvfp4 --device cuda --calib-stats $STATS --out /tmp/wp$w --overwrite \
          --progress json | grep weight.pass)" >>$OUT/wp.txt
      done
      # the disk under the export: buffered write of 3 GB, then with fdatasync (the writer's durability)
      (dd if=/dev/zero of=/tmp/dd.bin bs=16M count=192 2>&1 | tail -1; rm -f /tmp/dd.bin
       dd if=/dev/zero of=/tmp/dd.bin bs=16M count=192 conv=fdatasync 2>&1 | tail -1; rm -f /tmp/dd.bin) >>$OUT/wp.txt ;;
    build)   # the issue model only (page-cached), and one calibration file for the weight-pass-only steps
      python3 -c "
import sys; sys.path[:0] = ['$SRC', '.']
from pathlib import Path
from benchmarks.modelopt_side_by_side import ISSUE_MODEL, _name_architecture
from benchmarks.export_bench import _page_cache, synthetic_model
src, _ = synthetic_model(Path('/tmp/sbs/issue/src'), dict(ISSUE_MODEL)); _name_architecture(src / 'config.json')
print('page cache', _page_cache(src), _page_cache(src))" >>$LOG 2>&1
      [ -f $CALIB ] || PYTHONPATH=$SRC:. python3 -m quantgate.service.cli quantize \
        /tmp/sbs/issue/src --recipe nvfp4 --device cuda --calib-samples 8 --calib-seq-len 128 --out $(dirname $CALIB) \
        --overwrite >>$LOG 2>&1 ;;
    worker)   # the service's worker (a job spec, as the executor writes it) on the GPU: calibration in its own process
      rm -rf /tmp/wjob && mkdir -p /tmp/wjob/outputs
      echo '{"source": "/tmp/sbs/issue/src", "recipe": "nvfp4", "output": "/tmp/wjob/outputs/job-1", "job_dir": "/tmp/wjob",
        "calibration": {"samples": 64, "seq_len": 512, "batch_size": 8}}' >/tmp/wjob/spec.json
      PYTHONPATH=$SRC:. python3 -c "
import subprocess, sys, time
t = time.perf_counter()
done = subprocess.run([sys.executable, '-m', 'quantgate.service.worker', '/tmp/wjob/spec.json'], stdout=open('$OUT/worker_events.jsonl', 'w'),
                      stderr=open('$OUT/worker_stderr.txt', 'w'))
print('worker rc', done.returncode, 'wall', round(time.perf_counter() - t, 2))" >>$OUT/worker.txt 2>&1 ;;
    sysinfo)   # the machine under the numbers: kernel, the export's filesystem, transparent huge pages, memory
      (uname -r; df -T /tmp | tail -1; cat /sys/kernel/mm/transparent_hugepage/enabled; grep -E "MemTotal|MemFree|^Cached" /proc/meminfo;
       lscpu | grep -E "Model name|NUMA node") >>$OUT/sysinfo.txt 2>&1 ;;
    memwarm)   # touch 40 GiB of fresh memory once (a VM's host backs guest memory on first touch), then free it
      PYTHONPATH=$SRC:. python3 -c "
import time, torch
t = time.perf_counter(); x = torch.ones(40 * 2**30 // 4); s = float(x[::4096].sum()); del x
print('memwarm 40 GiB', round(time.perf_counter() - t, 2), 's')" >>$OUT/probe.txt 2>&1 ;;
    prof)   # where the weight pass's wall time goes, per thread: py-spy (carried in .whl/) on the weights-only job
      STATS=$CALIB
      for mode in ${PROF_MODES:-idle gil}; do
        flag=--idle; [ $mode = gil ] && flag=--gil
        PYTHONPATH=$SRC:. /tmp/mo/bin/py-spy record --threads $flag -r 250 -f raw -o $OUT/prof_$mode.txt -- \
          python3 -m quantgate.service.cli quantize /tmp/sbs/issue/src --recipe nvfp4 --device cuda --calib-stats $STATS \
          --out /tmp/prof_$mode --overwrite --progress json 2>&1 | grep "weight pass" >>$OUT/prof.txt
      done ;;
    writebench)   # what bounds the writes: pwrite GB/s into one file / a file each, by thread count
      PYTHONPATH=$SRC:. python3 -m benchmarks.write_bench /tmp --gib 3 >$OUT/write_bench.json 2>&1 ;;
    probe)   # the weights-only job with one stage taken out (benchmarks/weight_pass_probe.py), PROBES="base noprealloc nowrite mmap ..."
      # an entry may carry settings: "trace@QUANTGATE_FEED_AHEAD=4,QUANTGATE_WEIGHT_WORKERS=3"
      STATS=$CALIB
      for entry in ${PROBES:-base nowrite noread nosync nowrite+noread}; do
        v=${entry%%@*}; settings=""; [ "$v" != "$entry" ] && settings=$(echo "${entry#*@}" | tr , ' ')
        echo "$entry workers=${QUANTGATE_WEIGHT_WORKERS:-default} $(env $settings PYTHONPATH=$SRC:. python3 -m benchmarks.weight_pass_probe $v -- quantize \
          /tmp/sbs/issue/src --recipe nvfp4 --device cuda --calib-stats $STATS --out /tmp/probe --overwrite \
          --progress json 2>&1 | grep "weight pass")" >>$OUT/probe.txt
      done ;;
    loadexp)   # from_pretrained of the issue model on one GPU: device_map "auto" vs "cuda" (after imports)
      PYTHONPATH=$SRC:. python3 -c "
import time, torch, transformers
src = '/tmp/sbs/issue/src'
for dm in ('auto', 'cuda', 'auto', 'cuda'):
    t = time.perf_counter()
    m = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, device_map=dm)
    torch.cuda.synchronize()
    print(dm, round(time.perf_counter() - t, 3), flush=True)
    del m; torch.cuda.empty_cache()
" >>$OUT/loadexp.txt 2>&1 ;;
    trimports)   # where transformers' first-use imports go (import_transformers, cumulative us, largest first)
      PYTHONPATH=$SRC:. python3 -X importtime -c "import torch; from quantgate.exporter.calibration.model import \
        import_transformers as i; print('import_transformers', i())" 2>$OUT/trimport_raw.txt >$OUT/trimport.txt
      sort -t'|' -k2 -n -r $OUT/trimport_raw.txt | head -60 >>$OUT/trimport.txt; rm -f $OUT/trimport_raw.txt ;;
    imports)   # where the CLI's import time goes (cumulative microseconds, largest first)
      PYTHONPATH=$SRC:. python3 -X importtime -c "import quantgate.service.commands.quantize as q, quantgate.exporter.pipeline, \
        quantgate.exporter.calibration.forward, quantgate.exporter.calibration.model, transformers; from transformers import AutoModelForCausalLM; \
        import transformers.models.gemma4.modeling_gemma4" 2>&1 | sort -t'|' -k2 -n -r | head -40 >$OUT/importtime.txt ;;
  esac
  echo "=== $step done rc=$? $(date -u +%T)" >>$LOG
done
