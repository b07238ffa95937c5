"""What a run writes while it trains: metrics.jsonl, TensorBoard, a log line.

`metrics.jsonl` holds one JSON object per record: {'step', 'split' ('train'
| 'valid'), 'attempt' (0 for the first process of a run, +1 per resume),
metric: value, ...}. A resumed run re-logs the steps after its checkpoint, so
readers keep the last record per (split, step): `read_metrics` does.
TensorBoard event files go to `<workdir>/tensorboard` (tensorboardX).
"""

from __future__ import annotations

import datetime
import json
import math
import os
from typing import Any, Mapping

from absl import logging
import numpy as np

METRICS_FILE = 'metrics.jsonl'


def _plain(value: Any) -> Any:
  """numpy / jax scalars and arrays -> JSON-able floats and lists."""
  array = np.asarray(value)
  if array.ndim == 0:
    item = array.item()
    return float(item) if isinstance(item, float) or array.dtype.kind == 'f' \
        else item
  return [_plain(v) for v in array]


class RunLog:
  """Appends records to metrics.jsonl and TensorBoard; prints progress lines."""

  def __init__(self, workdir: str, *, attempt: int, total_steps: int,
               is_primary: bool = True):
    self.workdir, self.attempt = workdir, attempt
    self.total_steps = total_steps
    self.is_primary = is_primary
    self._jsonl = None
    self._tb = None
    if is_primary:
      self._jsonl = open(os.path.join(workdir, METRICS_FILE), 'a',
                         encoding='utf-8')
      try:
        import tensorboardX  # pylint: disable=g-import-not-at-top
        self._tb = tensorboardX.SummaryWriter(
            os.path.join(workdir, 'tensorboard'))
      except ImportError:
        logging.warning('tensorboardX is not installed: no TensorBoard '
                        'events (pip install tensorboardX).')

  def write(self, split: str, step: int, metrics: Mapping[str, Any]) -> None:
    """One record; list-valued metrics go to TensorBoard per index."""
    if not self.is_primary:
      return
    record = {'step': int(step), 'split': split, 'attempt': self.attempt}
    record.update({k: _plain(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      for name, value in record.items():
        if name in ('step', 'split', 'attempt'):
          continue
        if isinstance(value, list):
          for i, v in enumerate(value):
            self._tb.add_scalar(f'{split}/{name}/{i}', v, step)
        elif isinstance(value, (int, float)):
          self._tb.add_scalar(f'{split}/{name}', value, step)
      self._tb.flush()

  def progress(self, step: int, metrics: Mapping[str, Any],
               tokens_per_s: float, seconds_left: float | None) -> None:
    """A log line: step, loss, perplexity, aux losses, balance, speed, ETA."""
    parts = [f'step {step}/{self.total_steps}',
             f"loss {metrics['loss']:.4f}",
             f"ppl {math.exp(min(metrics['ce'], 50.0)):.2f}"]
    for name, value in metrics.items():
      if name.startswith('aux/'):
        parts.append(f'{name[4:]} {value:.4g}')
    if 'max_mean_load' in metrics:
      load = np.asarray(metrics['max_mean_load'])
      parts.append('max/mean load ' + ' '.join(f'{v:.2f}' for v in load))
    if 'mfu' in metrics:
      parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
    parts.append(f"lr {metrics['learning_rate']:.3g}")
    parts.append(f'{tokens_per_s:,.0f} tok/s')
    if seconds_left is not None:
      parts.append('ETA ' + str(datetime.timedelta(seconds=int(seconds_left))))
    logging.info(' | '.join(parts))

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str, split: str = 'train'):
  """metrics.jsonl as a pandas DataFrame: the last record per step, by step."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no metrics (has the run started?)')
  with open(path, encoding='utf-8') as f:
    rows = [json.loads(line) for line in f if line.strip()]
  frame = pd.DataFrame([r for r in rows if r['split'] == split])
  if frame.empty:
    return frame
  return (frame.drop_duplicates('step', keep='last')
          .sort_values('step').reset_index(drop=True))
