#!/usr/bin/env bash
# Runs N processes of one command on this machine, joined by jax.distributed:
# multi-host code tested on one box (CPU devices, or GPUs split per process).
#
#   launch/local.sh N [--cpu_devices D | --gpus_per_process G] -- COMMAND...
#
# Example (2 processes x 4 CPU devices = one 8-device mesh):
#   launch/local.sh 2 --cpu_devices 4 -- \
#     python -m moe_jax.main --config=configs/smoe_154m.py:tiny --workdir=/tmp/two
#
# Process 0 writes to this terminal; process i > 0 to $LOG_DIR/process_<i>.log
# (LOG_DIR defaults to a new temporary directory, printed at start). The
# coordinator port is JAX_COORDINATOR_PORT or a free one. Exits non-zero if
# any process fails, and stops the others then.
set -euo pipefail

usage() { sed -n '2,15p' "$0" >&2; exit 2; }
[[ $# -ge 3 ]] || usage
N=$1; shift
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: N must be a positive integer, got '$N'" >&2; exit 2; }
CPU_DEVICES=""; GPUS=""
while [[ $# -gt 0 && $1 != "--" ]]; do
  case $1 in
    --cpu_devices) CPU_DEVICES=$2; shift 2 ;;
    --gpus_per_process) GPUS=$2; shift 2 ;;
    *) echo "local.sh: unknown option '$1'" >&2; usage ;;
  esac
done
[[ ${1:-} == "--" ]] || usage
shift
[[ $# -gt 0 ]] || usage

PORT=${JAX_COORDINATOR_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')}
LOG_DIR=${LOG_DIR:-$(mktemp -d -t moe_jax_local.XXXXXX)}
mkdir -p "$LOG_DIR"
echo "local.sh: $N processes, coordinator localhost:$PORT, logs of processes 1..$((N - 1)) in $LOG_DIR" >&2

pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup INT TERM

for ((i = 0; i < N; i++)); do
  env_vars=(JAX_COORDINATOR_ADDRESS="localhost:$PORT" JAX_NUM_PROCESSES="$N" JAX_PROCESS_ID="$i")
  if [[ -n $CPU_DEVICES ]]; then
    env_vars+=(JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$CPU_DEVICES")
  fi
  if [[ -n $GPUS ]]; then
    env_vars+=(CUDA_VISIBLE_DEVICES="$(seq -s, $((i * GPUS)) $((i * GPUS + GPUS - 1)))")
  fi
  if [[ $i -eq 0 ]]; then
    env "${env_vars[@]}" "$@" &
  else
    env "${env_vars[@]}" "$@" > "$LOG_DIR/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done

status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "local.sh: process $i failed (log: $([[ $i -eq 0 ]] && echo terminal || echo "$LOG_DIR/process_$i.log"))" >&2
    status=1
    cleanup
  fi
done
exit $status
