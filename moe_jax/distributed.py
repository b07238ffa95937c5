"""Multi-process start-up: `jax.distributed.initialize` from the environment.

Read, in order:
  * JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID, as `launch/local.sh` and `launch/multihost.sh` set them;
    optionally JAX_LOCAL_DEVICE_IDS (comma-separated accelerator ids).
  * Otherwise a SLURM job with more than one task (SLURM_NTASKS > 1): JAX's
    own SLURM detection (coordinator from the node list, one process per
    task, its GPU from SLURM_LOCALID).
  * Otherwise nothing: one process owns every local device.
"""

from __future__ import annotations

import os

import jax

_VARS = ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID')


def _int_var(name: str) -> int:
  value = os.environ.get(name, '')
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'environment variable {name}={value!r}: expected an '
                     'integer (set it with the coordinator address; see '
                     'launch/multihost.sh)') from None


def initialize_from_environment() -> bool:
  """Joins the multi-process job the environment describes; False if none."""
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    missing = [v for v in _VARS if not os.environ.get(v)]
    if missing:
      raise ValueError(f'JAX_COORDINATOR_ADDRESS is set but {missing} are '
                       'not: a multi-process run needs all of ' + str(_VARS))
    local = os.environ.get('JAX_LOCAL_DEVICE_IDS')
    jax.distributed.initialize(
        coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
        num_processes=_int_var('JAX_NUM_PROCESSES'),
        process_id=_int_var('JAX_PROCESS_ID'),
        local_device_ids=[int(i) for i in local.split(',')] if local else None)
    return True
  if int(os.environ.get('SLURM_NTASKS', '1') or 1) > 1:
    jax.distributed.initialize()
    return True
  return False
