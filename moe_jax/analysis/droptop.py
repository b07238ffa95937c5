"""DropTop-1 / DropTop-1&2 (algorithms.md §9): how much a model leans on its
top expert.

The workdir's checkpoint is evaluated on its validation set as trained, then
with each token's top-1 (and top-1 and top-2) selected slot removed in every
MoE layer and the remaining weights renormalised (`router_options.drop_top`,
moe_jax/moe/routers/base.py drop_top_slots). The result is the loss and
next-token accuracy of each variant and their change from the intact model,
and, where the zero-shot task files are at hand (config.eval.data_dir), the
change in the average zero-shot score: the DropTop of algorithms.md §9.

  python -m moe_jax.main --config=... --workdir=DIR --mode=droptop
writes DIR/droptop.json; the routing report (moe_jax.analysis.report) shows it.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any, Callable

import jax
import numpy as np
import pandas as pd
from absl import logging
from ml_collections import ConfigDict

from moe_jax import models
from moe_jax import restore
from moe_jax import scoring
from moe_jax.analysis import results
from moe_jax.analysis import tracing
from moe_jax.data import from_config
from moe_jax.moe import router as router_lib

NAMES = {0: 'intact', 1: 'DropTop-1', 2: 'DropTop-1&2'}
RESULT_FILE = 'droptop.json'


def with_drop_top(config: ConfigDict, n: int) -> ConfigDict:
  """A copy of `config` whose MoE layers drop each token's top n slots."""
  config = copy.deepcopy(config)
  with config.unlocked():
    config.moe.router_options.drop_top = n
  return config


def slots_per_token(config: ConfigDict) -> int:
  """K of the config's router (ReMoE: its slot budget)."""
  options = dict(config.moe.router_options.to_dict())
  options.pop('drop_top', None)
  cfg = router_lib.make_config(
      config.moe.router, num_experts=config.moe.num_experts,
      top_k=config.moe.top_k, d_model=config.model.d_model, **options)
  return router_lib.num_slots(config.moe.router, cfg)


def evaluate_droptop(config: ConfigDict, workdir: str, *,
                     drops: tuple[int, ...] = (1, 2),
                     step: int | None = None,
                     zero_shot: Callable[[Any, int], float] | None = None
                     ) -> pd.DataFrame:
  """Validation loss / accuracy of the checkpoint with 0 and `drops` removed.

  Args:
    config: the run's config.
    workdir: the run directory (its checkpoints and data cache are used).
    drops: slot counts to remove; those that would leave a token no slot
      (n >= K) are skipped with a log line.
    step: checkpoint step (default: the newest).
    zero_shot: (model, step) -> the average zero-shot score of the
      checkpoint's parameters in `model` (eval/zero_shot.py); the DropTop
      of algorithms.md §9 is the change of this score. None: validation
      only.

  Returns:
    One row per variant: drop, name, loss, ppl, accuracy, delta_loss,
    delta_accuracy (relative to the intact model), step; with zero_shot
    also zero_shot_average and delta_zero_shot.
  """
  slots = slots_per_token(config)
  usable = [n for n in drops if 0 < n < slots]
  for n in sorted(set(drops) - set(usable)):
    logging.warning('DropTop-%d skipped: the router has %d slot(s) per token, '
                    'and drop_top must leave at least one', n, slots)
  tracing.require_routing(config, 'evaluate')
  run = restore.restore_run(config, workdir, step, what='evaluate')
  step = run.step
  pipeline = from_config.build_data(config, os.path.abspath(workdir))
  rows = []
  for n in [0, *usable]:
    model = models.build(with_drop_top(config, n))
    eval_fn = jax.jit(functools.partial(scoring.eval_step, model=model))
    score = lambda batch: eval_fn(run.params, run.router_state, run.step,
                                  batch)
    valid = scoring.evaluate(score, (
        {k: np.asarray(batch[k]) for k in ('inputs', 'targets')}
        for batch in pipeline.valid_iterator()))
    rows.append({'drop': n, 'name': NAMES.get(n, f'DropTop-{n}'),
                 'loss': valid['loss'], 'ppl': valid['ppl'],
                 'accuracy': valid['accuracy']})
    if zero_shot is not None:
      rows[-1]['zero_shot_average'] = zero_shot(model, step)
  frame = pd.DataFrame(rows)
  frame['delta_loss'] = frame['loss'] - frame['loss'].iloc[0]
  frame['delta_accuracy'] = frame['accuracy'] - frame['accuracy'].iloc[0]
  if zero_shot is not None:
    frame['delta_zero_shot'] = (frame['zero_shot_average'] -
                                frame['zero_shot_average'].iloc[0])
  frame['step'] = step
  return frame


def write_droptop(workdir: str, frame: pd.DataFrame) -> str:
  """Saves the result as DIR/droptop.json (atomically); returns its path."""
  return results.write_table(workdir, RESULT_FILE, frame)


def read_droptop(workdir: str) -> pd.DataFrame | None:
  """DIR/droptop.json as a DataFrame, or None when it was not computed."""
  return results.read_table(workdir, RESULT_FILE)
