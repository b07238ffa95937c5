"""What a run writes beside its checkpoints: config.json, metrics.jsonl,
TensorBoard events, progress lines; and the atomic-write helpers.

`metrics.jsonl` holds one JSON object per record: {'step', 'split' ('train'
| 'valid'), 'attempt' (0 for the first process of a run, +1 per resume),
metric: value, ...}. A resumed run re-logs the steps after its checkpoint, so
readers keep the last record per (split, step): `read_metrics` does.

Each record is appended with one write() of a whole line to a file opened
with O_APPEND. A kill during that write can still leave a torn final line;
readers skip it with a warning, and the next RunLog cuts it off before
appending, so the file stays one valid record per line.
TensorBoard event files go to `<workdir>/tensorboard` (tensorboardX).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import tempfile
from typing import Any, Mapping

from absl import logging
import ml_collections
import numpy as np

METRICS_FILE = 'metrics.jsonl'
CONFIG_FILE = 'config.json'


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` via a temporary file and a rename (all or nothing)."""
  write_bytes_atomic(path, text.encode('utf-8'))


def write_bytes_atomic(path: str, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file and a rename."""
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or '.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def flatten(tree: Mapping, prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def load_saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The workdir's resolved config (its config.json) as a ConfigDict.

  Raises:
    FileNotFoundError: no config.json (not a moe_jax run directory).
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no config.json; {workdir!r} is not a '
                            'moe_jax run directory (python -m moe_jax.main '
                            '--workdir=...)')
  with open(path, encoding='utf-8') as f:
    return ml_collections.ConfigDict(json.load(f))


def read_saved_config(workdir: str) -> dict[str, Any] | None:
  """The workdir's config.json, flattened ('model.num_layers': 2), or None."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return flatten(json.load(f))


def changed_fields(old: Mapping[str, Any], config) -> dict[str, tuple]:
  """{field: (saved value, value in `config`)} of every field that differs."""
  new = flatten(json.loads(config.to_json_best_effort()))
  return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k)}


def write_resolved_config(config, workdir: str) -> None:
  """Writes config.json; on a resume, logs every field that changed."""
  old = read_saved_config(workdir)
  for key, (before, after) in changed_fields(old or {}, config).items():
    if old is not None:
      logging.warning('config.%s changed since the last start of this '
                      'workdir: %r -> %r', key, before, after)
  write_text_atomic(os.path.join(workdir, CONFIG_FILE),
                    config.to_json_best_effort(indent=2, sort_keys=True))


def read_records(workdir: str) -> list[dict]:
  """Every record of metrics.jsonl; a torn final line is skipped (warned)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8', errors='replace') as f:
    lines = [line for line in f.read().split('\n') if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i != len(lines) - 1:
        raise ValueError(f'{path}: line {i + 1} is not a JSON record (only '
                         'a torn final line is expected after a kill): '
                         f'{line[:80]!r}') from None
      logging.warning('%s: skipping a torn final line (%d characters; a '
                      'kill during a write leaves one)', path, len(line))
  return records


def next_attempt(workdir: str) -> int:
  """0 for a new run, else 1 + the highest attempt in metrics.jsonl."""
  attempts = [r.get('attempt', 0) for r in read_records(workdir)]
  return max(attempts, default=-1) + 1


def _cut_torn_tail(path: str) -> None:
  """Truncates a final line without its newline (a write cut by a kill)."""
  if not os.path.exists(path):
    return
  with open(path, 'rb+') as f:
    data = f.read()
    if not data or data.endswith(b'\n'):
      return
    keep = data.rfind(b'\n') + 1
    f.truncate(keep)
  logging.warning('%s: cut off a torn final line of %d bytes before '
                  'appending', path, len(data) - keep)


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
      path = os.path.join(workdir, METRICS_FILE)
      _cut_torn_tail(path)
      self._jsonl = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                            0o644)
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
    # One write of the whole line: a record is in the file whole or not.
    os.write(self._jsonl, (json.dumps(record) + '\n').encode('utf-8'))
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
      os.close(self._jsonl)
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str, split: str = 'train'):
  """metrics.jsonl as a pandas DataFrame: the last record per step, by step."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no metrics (has the run started?)')
  rows = read_records(workdir)
  frame = pd.DataFrame([r for r in rows if r['split'] == split])
  if frame.empty:
    return frame
  return (frame.drop_duplicates('step', keep='last')
          .sort_values('step').reset_index(drop=True))
