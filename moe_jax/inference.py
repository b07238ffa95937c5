"""A trained run's model and state, restored for inference-time analysis.

Tracing (moe_jax/trace.py) and DropTop (moe_jax/analysis/droptop.py) evaluate
a workdir's checkpoint on one device; this restores it without building the
training mesh.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
from ml_collections import ConfigDict

from moe_jax import checkpoint as checkpoint_lib
from moe_jax import config_lib
from moe_jax import train as train_lib


def restore_trained(config: ConfigDict, workdir: str,
                    step: int | None = None, *, what: str = 'analyse'):
  """(model, TrainState, step) of a workdir's checkpoint, on one device.

  Args:
    config: the run's config (as for training).
    workdir: the run directory (its `checkpoints/`).
    step: the checkpoint to restore (default: the newest).
    what: the verb for error messages ('trace', 'analyse', ...).
  """
  if config.model.dense_ffn:
    raise ValueError(f'model.dense_ffn: the dense baseline has no routing to '
                     f'{what}')
  model = config_lib.build_model(config)
  optimizer, _ = train_lib.make_optimizer(config.train)
  init = lambda k: train_lib.init_state(k, model=model, optimizer=optimizer,
                                        config=config)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
      nn.unbox(jax.eval_shape(init, jax.random.key(0))))
  checkpoints = checkpoint_lib.Checkpointer(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      keep=config.train.keep)
  try:
    steps = checkpoints.all_steps()
    if not steps:
      raise FileNotFoundError(
          f'{checkpoints.directory}: no checkpoint to {what}; train first '
          '(--mode=train) or point --workdir at a trained run')
    step = steps[-1] if step is None else step
    if step not in steps:
      raise ValueError(f'step={step}: no such checkpoint; have {steps}')
    state, _ = checkpoints.restore(step, abstract)
  finally:
    checkpoints.close()
  return model, state, step
