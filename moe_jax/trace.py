"""Routing traces: what every router did, per layer and token, as Parquet.

A trace of one checkpoint over an evaluation set is a hive-partitioned
Parquet dataset under `<workdir>/traces/`:

  traces/step=<checkpoint step>/layer=<l>/part-0.parquet

one row per (token, layer) with columns
  sequence   int32   index of the window in the evaluation set
  position   int32   token position in the window
  token      int32   input token id
  domain     int32   the window's domain / task label (-1 if none)
  choice_<j> int16   j-th selected id in the router's output space [0, E')
                     (FFN experts first, then special / null slots), j < K
                     or -1 for an inactive slot (unused ReMoE / HyperRouter
                     slots, DropTop's removed slots): selected = choice >= 0
  weight_<j> float32 its routing weight (RouterOutput.analysis_weight: MoE++
                     copy / constant slots carry theirs; 0 for inactive slots)
  top1       int16   argmax of the router's full distribution (§9's top-1,
                     which a biased selection such as DeepSeek-V3's can put
                     elsewhere than choice_0), -1 for a token routed nowhere;
                     absent from traces written before it existed
  prob_<e>   float16 the router's full distribution (analysis_probs), only
                     with `with_probs=True` (T x E' values: large)
so `pandas.read_parquet(path, filters=[('layer', '=', 3)])` loads one layer
of every checkpoint, and `.../traces/step=200` one checkpoint.

This module is the format only (write, read); recording a model's routing
into it is moe_jax/analysis/tracing.py.

Dimension legend: B batch, S sequence, L layers, K slots, E' router width.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def _layer_table(sequence, position, token, domain, layer: dict) -> pa.Table:
  columns = {'sequence': sequence, 'position': position, 'token': token,
             'domain': domain}
  choice = np.asarray(layer['choice'])
  weight = np.asarray(layer['weight'], np.float32)
  for j in range(choice.shape[1]):
    columns[f'choice_{j}'] = choice[:, j].astype(np.int16)
  for j in range(weight.shape[1]):
    columns[f'weight_{j}'] = weight[:, j]
  if 'top1' in layer:
    columns['top1'] = np.asarray(layer['top1']).astype(np.int16)
  if 'probs' in layer:
    probs = np.asarray(layer['probs'], np.float16)
    for e in range(probs.shape[1]):
      columns[f'prob_{e}'] = probs[:, e]
  return pa.table(columns)


def write_trace(directory: str, step: int,
                batches: Iterable[tuple[np.ndarray, np.ndarray, dict]],
                ) -> dict[str, Any]:
  """Writes `traces/step=<step>/layer=<l>/part-0.parquet` atomically.

  Args:
    directory: the traces directory (e.g. <workdir>/traces).
    step: the checkpoint step.
    batches: (tokens [B, S], domain [B] or None, per-layer routing list of
      [B*S, ...] arrays) triples, in evaluation-set order.

  Returns:
    {'rows': token-layer rows written, 'layers': L, 'path': the step dir}.
  """
  parts: list[list[pa.Table]] = []
  first_sequence = 0
  for tokens, domain, layers in batches:
    b, s = tokens.shape
    sequence = np.repeat(np.arange(first_sequence, first_sequence + b,
                                   dtype=np.int32), s)
    position = np.tile(np.arange(s, dtype=np.int32), b)
    token = tokens.reshape(-1).astype(np.int32)
    labels = (np.full((b,), -1, np.int32) if domain is None
              else np.asarray(domain, np.int32))
    domain_col = np.repeat(labels, s)
    if not parts:
      parts = [[] for _ in layers]
    for i, layer in enumerate(layers):
      parts[i].append(_layer_table(sequence, position, token, domain_col,
                                   layer))
    first_sequence += b
  if not parts:
    raise ValueError('write_trace: no batches to trace (is the evaluation '
                     'set empty? config.train.eval_batches)')
  final = os.path.join(directory, f'step={step}')
  os.makedirs(directory, exist_ok=True)
  staging = tempfile.mkdtemp(dir=directory, prefix=f'.step={step}.tmp-')
  rows = 0
  for i, tables in enumerate(parts):
    table = pa.concat_tables(tables)
    rows += table.num_rows
    layer_dir = os.path.join(staging, f'layer={i}')
    os.makedirs(layer_dir)
    pq.write_table(table, os.path.join(layer_dir, 'part-0.parquet'))
  # Replace an older trace of the same step only once the new one is whole.
  if os.path.exists(final):
    shutil.rmtree(final)
  os.replace(staging, final)
  return {'rows': rows, 'layers': len(parts), 'path': final}


def read_trace(directory: str, *, step: int | None = None,
               layer: int | None = None):
  """The traces under `directory` as a pandas DataFrame (filtered on read)."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  filters = []
  if step is not None:
    filters.append(('step', '=', step))
  if layer is not None:
    filters.append(('layer', '=', layer))
  return pd.read_parquet(directory, filters=filters or None)
