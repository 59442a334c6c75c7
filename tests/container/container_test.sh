#!/usr/bin/env bash
# Build the quantgate image on a local Debian base and check it for real (`make container-test`).
#
# Needs root and a Debian/Ubuntu host; no container registry (none has to be reachable). It
#  1. installs docker.io and debootstrap when missing, starts `dockerd --storage-driver=vfs` (at
#     nice 10: the build runs in the daemon's children) when no daemon answers;
#  2. builds a Debian bookworm root filesystem with debootstrap, carrying this host's CA certificates
#     (registries may be reached through a TLS-intercepting proxy), and `docker import`s it;
#  3. `docker build --network host` on that base, with the host's local CAs as EXTRA_CA_CERTS and
#     torch from TORCH_INDEX_URL (default: the CPU index; when it is unreachable, a local CPU wheel
#     from pip's find-links served on 127.0.0.1, else PyPI's CUDA build);
#  4. runs the image with `--network host` and checks: the HEALTHCHECK turns healthy on an overridden
#     --port; a CPU job on a tiny model mounted read-only runs to a validated export; the validation
#     endpoint flags a broken checkpoint; the server runs as uid 10001; without API tokens it refuses
#     to listen on 0.0.0.0; after `docker stop` / `docker start` the job history in /data is intact.
# Results (build time, image size, each check) go to $WORK_DIR/results.json and stdout.
# Environment: PYTHON (a python with the [export] extra, to build the tiny model), WORK_DIR, IMAGE,
# BASE_IMAGE, TORCH_INDEX_URL, TORCH_VERSION, DEBIAN_MIRROR, KEEP=1 (keep container and volume).
# Usage: tests/container/container_test.sh [all|base|run]  (base: only step 2; run: step 4 on an image built earlier)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
WORK_DIR=${WORK_DIR:-/var/tmp/quantgate-container-test}
IMAGE=${IMAGE:-quantgate:container-test}
BASE_IMAGE=${BASE_IMAGE:-quantgate-base:bookworm}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
NAME=quantgate-ct
VOLUME=quantgate-ct-data
TOKEN=qg-container-test-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
CHECK="python3 $REPO/tests/container/container_check.py"
export DOCKER_BUILDKIT=0   # the classic builder: no buildx plugin needed, --network host honoured

log() { printf '\n== %s\n' "$*"; }
die() { printf 'container-test: %s\n' "$*" >&2; exit 1; }
RESULTS=()
record() { RESULTS+=("\"$1\": ${2:-null}"); printf '   %s: %s\n' "$1" "${2:-null}"; }
INDEX_PID=
trap '[ -z "$INDEX_PID" ] || kill "$INDEX_PID" 2>/dev/null || true' EXIT

[ "$(id -u)" = 0 ] || die "run as root (apt-get, dockerd, debootstrap)"
mkdir -p "$WORK_DIR"

ensure_tools() {
  local missing=()
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
  if ! docker info >/dev/null 2>&1; then
    log "starting dockerd (vfs storage driver, log $WORK_DIR/dockerd.log)"
    nice -n 10 dockerd --storage-driver=vfs >"$WORK_DIR/dockerd.log" 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && return 0; sleep 1; done
    die "dockerd did not come up; see $WORK_DIR/dockerd.log"
  fi
}

local_cas() {  # the host's locally added CA certificates, PEM
  cat /usr/local/share/ca-certificates/*.crt 2>/dev/null || true
}

build_base() {
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "base image $BASE_IMAGE exists"
    return 0
  fi
  local rootfs=$WORK_DIR/rootfs
  log "debootstrap bookworm into $rootfs"
  rm -rf "$rootfs"
  nice -n 10 debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$DEBIAN_MIRROR"
  # like an enterprise base image: the local CAs are trusted system-wide
  cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
  chroot "$rootfs" update-ca-certificates
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
  tar -C "$rootfs" -c . | docker import - "$BASE_IMAGE"
  rm -rf "$rootfs"
}

serve_local_wheel() {  # a one-package index on 127.0.0.1 for a CPU torch wheel pip's find-links hold
  local dirs wheel= index port
  dirs=$("$PYTHON" -m pip config get global.find-links 2>/dev/null || true)
  for dir in ${PIP_FIND_LINKS:-} $dirs; do
    wheel=$(ls "$dir"/torch-"$TORCH_VERSION"+cpu-cp311-cp311-*.whl 2>/dev/null | head -1 || true)
    [ -n "$wheel" ] && break
  done
  [ -n "$wheel" ] || return 1
  index=$WORK_DIR/torch-index
  rm -rf "$index" && mkdir -p "$index/torch"
  ln -s "$wheel" "$index/torch/$(basename "$wheel")"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  python3 -m http.server "$port" --bind 127.0.0.1 --directory "$index" >"$WORK_DIR/torch-index.log" 2>&1 &
  INDEX_PID=$!
  sleep 1
  TORCH_INDEX_URL=http://127.0.0.1:$port/
  TORCH_SOURCE="local wheel $wheel"
}

pick_torch_index() {
  if [ -n "${TORCH_INDEX_URL:-}" ]; then TORCH_SOURCE="TORCH_INDEX_URL"; return; fi
  if curl -fsS -o /dev/null --max-time 10 "$CPU_TORCH_INDEX/torch/"; then
    TORCH_INDEX_URL=$CPU_TORCH_INDEX; TORCH_SOURCE="the CPU index"
  elif serve_local_wheel; then
    :
  else
    TORCH_INDEX_URL=https://pypi.org/simple; TORCH_SOURCE="PyPI (CUDA build)"
  fi
}

build_image() {
  pick_torch_index
  log "docker build $IMAGE on $BASE_IMAGE, torch from $TORCH_SOURCE ($TORCH_INDEX_URL)"
  local start end
  start=$(date +%s)
  nice -n 10 docker build --network host \
    --build-arg CUDA_IMAGE="$BASE_IMAGE" \
    --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" \
    --build-arg TORCH_VERSION="$TORCH_VERSION" \
    --build-arg EXTRA_CA_CERTS="$(local_cas)" \
    -t "$IMAGE" "$REPO" 2>&1 | tee "$WORK_DIR/build.log"
  end=$(date +%s)
  record build_seconds "$((end - start))"
  record torch_source "\"$TORCH_SOURCE\""
  [ -z "$INDEX_PID" ] || kill "$INDEX_PID" 2>/dev/null || true
  INDEX_PID=
}

make_models() {
  log "tiny models in $WORK_DIR/models"
  rm -rf "$WORK_DIR/models" && mkdir -p "$WORK_DIR/models"
  (cd "$REPO" && PYTHONPATH=$REPO "$PYTHON" -c \
    "from quantgate.exporter.testkit.tiny_models import build_tiny; build_tiny('gemma4', '$WORK_DIR/models/gemma4-tiny')")
  $CHECK make-broken "$WORK_DIR/models/gemma4-tiny" "$WORK_DIR/models/broken-nvfp4-claim"
  chmod -R a+rX "$WORK_DIR/models"
}

wait_health() {  # until the container's HEALTHCHECK says healthy
  local status
  for _ in $(seq 90); do
    status=$(docker inspect -f '{{.State.Health.Status}}' "$NAME")
    [ "$status" = healthy ] && return 0
    [ "$(docker inspect -f '{{.State.Running}}' "$NAME")" = true ] || break
    sleep 2
  done
  docker logs "$NAME" 2>&1 | tail -20
  return 1
}

run_checks() {
  local port url uid job
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  url=http://127.0.0.1:$port
  docker rm -f "$NAME" >/dev/null 2>&1 || true
  docker volume rm "$VOLUME" >/dev/null 2>&1 || true

  log "no API tokens: the server must refuse to listen on 0.0.0.0"
  local refused=0 out
  out=$(docker run --rm --network host -e QUANTGATE_PORT="$port" "$IMAGE" 2>&1) || refused=$?
  printf '   %s\n' "$out" | tail -3
  record refused_exit_status "$refused"
  record refuses_without_tokens "$([ "$refused" = 2 ] && grep -qi token <<<"$out" && echo true || echo false)"

  log "run on --port $port (the image says QUANTGATE_PORT=8000), tiny models mounted read-only"
  docker run -d --name "$NAME" --network host \
    -e QUANTGATE_API_TOKENS="$TOKEN" -e QUANTGATE_ALLOWED_ROOTS=/models \
    -v "$WORK_DIR/models:/models:ro" -v "$VOLUME:/data" \
    "$IMAGE" --host 0.0.0.0 --port "$port" --gpu-slots cpu >/dev/null
  local t0=$SECONDS
  record healthy "$(wait_health && echo true || echo false)"
  record healthy_after_seconds "$((SECONDS - t0))"
  uid=$(docker exec "$NAME" awk '/^Uid:/ {print $2}' /proc/1/status)
  record server_uid "$uid"
  record non_root "$([ "$uid" = 10001 ] && echo true || echo false)"

  log "a CPU nvfp4 job on /models/gemma4-tiny (read-only)"
  job=$($CHECK job "$url" "$TOKEN" /models/gemma4-tiny) || true
  record job "$job"
  JOB_ID=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1]).get("job_id", ""))' "$job")

  log "the validation endpoint on a BF16 checkpoint whose config claims NVFP4"
  local broken
  broken=$($CHECK broken "$url" "$TOKEN" /models/broken-nvfp4-claim) || true
  record broken_checkpoint "$broken"

  log "docker stop / docker start: the job history in the /data volume"
  docker stop "$NAME" >/dev/null
  docker start "$NAME" >/dev/null
  record healthy_after_restart "$(wait_health && echo true || echo false)"
  local history
  history=$($CHECK history "$url" "$TOKEN" "$JOB_ID") || true
  record history_after_restart "$history"

  if [ "${KEEP:-0}" != 1 ]; then
    docker rm -f "$NAME" >/dev/null
    docker volume rm "$VOLUME" >/dev/null
  fi
}

STEP=${1:-all}   # base: only the local base image; run: check an image built earlier; all
case $STEP in base|run|all) ;; *) die "usage: $0 [base|run|all]";; esac
ensure_tools
[ "$STEP" = run ] || build_base
[ "$STEP" = base ] && exit 0
[ "$STEP" = run ] || build_image
record image_bytes "$(docker image inspect -f '{{.Size}}' "$IMAGE")"
make_models
run_checks

python3 - "$WORK_DIR" "${RESULTS[@]}" <<'EOF'
import json, sys
from pathlib import Path
work, items = Path(sys.argv[1]), sys.argv[2:]
results = json.loads("{" + ", ".join(items) + "}")
(work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
checks = ("refuses_without_tokens", "healthy", "non_root", "healthy_after_restart")
nested = ("job", "broken_checkpoint", "history_after_restart")
ok = all(results.get(k) is True for k in checks) and all(results.get(k, {}).get("ok") for k in nested)
print(json.dumps(results, indent=2))
print("container-test:", "PASSED" if ok else "FAILED", f"(results in {work / 'results.json'})")
sys.exit(0 if ok else 1)
EOF
