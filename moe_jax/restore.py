"""A trained run's model and variables, restored without the training loop.

Tracing, DropTop, expert similarity and (next) evaluation and export score a
workdir's checkpoint on one device. They need the parameters and the router
state, not the optimiser: this reads only those two items of the checkpoint
(orbax partial restore), so no optimiser is built and no optimiser state is
read into memory.

A config that does not match the checkpoint (the model was changed on the
command line, or the wrong config file was given) is an error that names the
changed config fields and the mismatched parameters, never a raw tree error.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
from ml_collections import ConfigDict
import orbax.checkpoint as ocp

from moe_jax import checkpoint as checkpoint_lib
from moe_jax import models
from moe_jax import run_log
from moe_jax import state as state_lib
from moe_jax.convert import init_from_hf
from moe_jax.validation import ConfigMismatch

# The parts of a TrainState an inference-time consumer reads.
_ITEMS = ('params', 'router_state', 'step')


@dataclasses.dataclass(frozen=True)
class RestoredRun:
  """What `restore_run` gives: the model and its variables on one device."""

  model: nn.Module
  params: Any
  router_state: Any
  step: int

  @property
  def variables(self) -> dict:
    """{'params', and 'router_state' when the model has one}, for apply."""
    out = {'params': self.params}
    if self.router_state:
      out['router_state'] = self.router_state
    return out


def abstract_variables(config: ConfigDict, model, device) -> dict:
  """{'params', 'router_state'} shapes of the config's model on `device`."""
  variables = jax.eval_shape(
      lambda k: state_lib.init_variables(k, model=model, seq_len=1),
      jax.random.key(0))
  variables = nn.unbox(variables)
  sharding = jax.sharding.SingleDeviceSharding(device)
  place = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding)
  return {'params': jax.tree.map(place, variables['params']),
          'router_state': jax.tree.map(
              place, dict(variables.get('router_state', {})))}


def mismatch_error(config: ConfigDict, workdir: str, step: int,
                   differences: list[str], what: str) -> ConfigMismatch:
  """A ConfigMismatch naming the config fields that changed and the tree paths
  that differ between the checkpoint and the config's model."""
  saved = run_log.read_saved_config(workdir)
  changed = run_log.changed_fields(saved, config) if saved else {}
  # Fields both configs have first: fields that newer code added (absent
  # from an older config.json) are rarely what the user changed.
  changed = dict(sorted(changed.items(), key=lambda kv: kv[1][0] is None))
  lines = [f'{workdir}: checkpoint {step} does not match this config, so it '
           f'cannot {what} it.']
  if changed:
    lines.append('Config fields that differ from the run\'s config.json: ' +
                 ', '.join(f'{k} ({a!r} -> {b!r})'
                           for k, (a, b) in list(changed.items())[:12]))
  lines.append('Checkpoint vs model: ' + '; '.join(differences[:10]))
  lines.append('Use the config the run was trained with (its config.json), or '
               'a new --workdir for a different model.')
  return ConfigMismatch('\n'.join(lines))


def checkpoint_steps(config: ConfigDict, workdir: str) -> list[int]:
  """The committed checkpoint steps of a workdir, oldest first."""
  checkpoints = checkpoint_lib.Checkpointer(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      keep=config.train.keep)
  try:
    return list(checkpoints.all_steps())
  finally:
    checkpoints.close()


def restore_run(config: ConfigDict, workdir: str, step: int | None = None, *,
                what: str = 'analyse') -> RestoredRun:
  """The model, parameters and router state of a workdir's checkpoint.

  Args:
    config: the run's config (as for training).
    workdir: the run directory (its `checkpoints/`).
    step: the checkpoint to restore (default: the newest).
    what: the verb for error messages ('trace', 'analyse', ...).

  Raises:
    FileNotFoundError: the workdir has no checkpoint.
    ValueError: no checkpoint `step`, or the config does not match it.
  """
  workdir = os.path.abspath(workdir)
  if config.init.get('hf_path'):
    # The model is defined by the HF directory's config.json, as in training.
    init_from_hf.resolve(config)
  model = models.build(config)
  # This process's own device: with several processes, devices()[0] may
  # belong to another process.
  device = jax.local_devices()[0]
  expected = abstract_variables(config, model, device)
  checkpoints = checkpoint_lib.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep=config.train.keep)
  try:
    steps = checkpoints.all_steps()
    if not steps:
      raise FileNotFoundError(
          f'{checkpoints.directory}: no checkpoint to {what}; train first '
          '(--mode=train) or point --workdir at a trained run')
    step = steps[-1] if step is None else step
    if step not in steps:
      raise ValueError(f'step={step}: no such checkpoint; have {steps}')
    state_dir = os.path.join(checkpoints.directory, str(step), 'state')
    # The checksums written at save time; a damaged file is an error here
    # (training sets such a checkpoint aside and falls back; analysis
    # should not silently read an older one).
    checkpoints.verify(step)
  finally:
    checkpoints.close()
  reader = ocp.PyTreeCheckpointer()
  saved = reader.metadata(state_dir).item_metadata.tree
  differences = checkpoint_lib.tree_differences(
      {k: saved.get(k) or {} for k in ('params', 'router_state')}, expected)
  if differences:
    raise mismatch_error(config, workdir, step, differences, what)
  sharding = jax.sharding.SingleDeviceSharding(device)
  target = dict(expected, step=jax.ShapeDtypeStruct((), saved['step'].dtype,
                                                     sharding=sharding))
  restored = reader.restore(state_dir, args=ocp.args.PyTreeRestore(
      item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(
          target), partial_restore=True))
  return RestoredRun(model=model, params=restored['params'],
                     router_state=restored.get('router_state') or {},
                     step=int(restored['step']))
