"""orbax checkpoints of a run: asynchronous, atomic, last K plus the best.

Layout: `<workdir>/checkpoints/<step>/{state,data}`; `state` is the train
state (params, optimiser, router state, ReMoE lambda, step), `data` the
grain iterator state as JSON, so a resumed run reads exactly the batches an
uninterrupted run would.

Safety:
  * orbax writes each step into a temporary directory and renames it when
    complete, so a save cut short (SIGKILL, power loss) never looks like a
    checkpoint; unfinished temporaries are ignored.
  * A checkpoint that exists but cannot be restored (a truncated or damaged
    file) is never skipped silently: `restore_latest` logs an error naming it,
    renames it to `<step>.corrupt-<time>` (kept for inspection, never
    deleted) and falls back to the next older one.
  * Retention: the `keep` most recent checkpoints plus the one with the lowest
    validation loss (the best is often not the last).
"""

from __future__ import annotations

import os
import time
from typing import Any

from absl import logging
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

VALID_METRIC = 'valid_loss'


class Checkpointer:
  """Saves and restores (train state, iterator state) under one directory."""

  def __init__(self, directory: str | os.PathLike, *, keep: int,
               asynchronous: bool = True):
    self.directory = os.path.abspath(os.fspath(directory))
    policy = ocp_policies.AnyPreservationPolicy([
        ocp_policies.LatestN(n=keep),
        ocp_policies.BestN(get_metric_fn=lambda m: m[VALID_METRIC],
                           reverse=True, n=1,
                           keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, create=True,
        enable_async_checkpointing=asynchronous)
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=('state', 'data'), options=options)

  def all_steps(self) -> list[int]:
    """Steps of complete checkpoints, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict,
           valid_loss: float | None = None) -> None:
    """Starts an asynchronous save of `state` and the iterator state."""
    metrics = None if valid_loss is None else {VALID_METRIC: valid_loss}
    self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      data=ocp.args.JsonSave(data_state)),
        metrics=metrics)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state, iterator state) of `step`; `abstract_state` gives shardings."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore()))
    return restored['state'], restored['data']

  def restore_latest(self, abstract_state: Any
                     ) -> tuple[int, Any, dict] | None:
    """The newest checkpoint that restores, or None if there is none.

    A checkpoint that fails to restore is renamed aside (see module
    docstring) with an error in the log, and the next older one is tried.
    """
    for step in reversed(self.all_steps()):
      try:
        state, data_state = self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-except
        aside = self._move_aside(step)
        logging.error(
            'checkpoint %d in %s could not be restored (%s: %s); moved to %s '
            'and falling back to an older checkpoint.', step, self.directory,
            type(e).__name__, str(e)[:300], aside)
        continue
      return step, state, data_state
    return None

  def _move_aside(self, step: int) -> str:
    source = os.path.join(self.directory, str(step))
    target = f'{source}.corrupt-{int(time.time())}'
    os.replace(source, target)
    self._manager.reload()
    return target

  def best_step(self) -> int | None:
    """The kept checkpoint with the lowest validation loss, if any has one."""
    best = None
    for info in self._manager._checkpoints:  # pylint: disable=protected-access
      if info.metrics and VALID_METRIC in info.metrics:
        if best is None or info.metrics[VALID_METRIC] < best[1]:
          best = (info.step, info.metrics[VALID_METRIC])
    return best[0] if best else None

  def wait(self) -> None:
    """Blocks until every started save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
