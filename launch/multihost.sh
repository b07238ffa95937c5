#!/usr/bin/env bash
# One process per host of a multi-host job, joined by jax.distributed. Run the
# same line on every host, with that host's id (0 on the coordinator host).
#
#   COORDINATOR=HOST0:PORT NUM_HOSTS=N HOST_ID=i launch/multihost.sh COMMAND...
#
# Example (4 GPU hosts, each using all of its GPUs):
#   # on host 0 (10.0.0.1):
#   COORDINATOR=10.0.0.1:8476 NUM_HOSTS=4 HOST_ID=0 launch/multihost.sh \
#     python -m moe_jax.main --config=configs/smoe_660m.py --workdir=/shared/runs/smoe_660m
#   # on host i = 1..3: the same with HOST_ID=i.
#
# The workdir must be on storage every host sees (checkpoints are written
# collectively by orbax). Each host reads its own slice of every global batch;
# only host 0 writes metrics.jsonl, TensorBoard events and progress lines.
set -euo pipefail
for var in COORDINATOR NUM_HOSTS HOST_ID; do
  if [[ -z ${!var:-} ]]; then
    echo "multihost.sh: set $var (see the top of $0)" >&2
    exit 2
  fi
done
[[ $# -gt 0 ]] || { echo "multihost.sh: no command given" >&2; exit 2; }
export JAX_COORDINATOR_ADDRESS=$COORDINATOR JAX_NUM_PROCESSES=$NUM_HOSTS JAX_PROCESS_ID=$HOST_ID
exec "$@"
