"""Analysis results saved beside a run: one JSON table per analysis.

`--mode=droptop` writes DIR/droptop.json and `--mode=similarity`
DIR/similarity.json; the report and the notebook read them back.
"""

from __future__ import annotations

import json
import os

import pandas as pd

from moe_jax import run_log


def write_table(workdir: str, name: str, frame: pd.DataFrame) -> str:
  """Saves `frame` as DIR/<name> (JSON records, atomically); returns the path."""
  path = os.path.join(os.path.abspath(workdir), name)
  run_log.write_text_atomic(
      path, json.dumps(frame.to_dict(orient='records'), indent=1))
  return path


def read_table(workdir: str, name: str) -> pd.DataFrame | None:
  """DIR/<name> as a DataFrame, or None when that analysis was not run."""
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return pd.DataFrame(json.load(f))
