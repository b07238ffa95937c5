"""Routing report of a workdir's traces: PNG figures and a Markdown summary.

  python -m moe_jax.analysis.report --workdir=DIR [--width=E']

Reads `DIR/traces/` (written by `python -m moe_jax.main --mode=trace`) and
writes to `DIR/report/`:
  frequency.png       expert-by-layer selection frequency (newest checkpoint)
  domain_entropy.png  per-domain selection entropy per layer
  margin.png          histogram of the router margin w_(1) - w_(2) per layer
  change_rate.png     expert change rate between consecutive checkpoints
                      (when more than one checkpoint was traced)
  summary.md          per-layer tables of the metrics of moe_jax.analysis.metrics
"""

from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use('Agg')
# pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from moe_jax import trace as trace_lib
from moe_jax.analysis import metrics


def _partitions(traces_dir: str, name: str) -> list[int]:
  """Sorted values of a hive partition key ('step' or 'layer')."""
  values = set()
  for root, dirs, _ in os.walk(traces_dir):
    for d in dirs:
      if d.startswith(f'{name}='):
        values.add(int(d.split('=', 1)[1]))
  return sorted(values)


def infer_width(frame: pd.DataFrame) -> int:
  """E' from the probability columns, else 1 + the largest selected id."""
  probs = [c for c in frame.columns if c.startswith('prob_')]
  if probs:
    return len(probs)
  return int(metrics.choices(frame).max()) + 1


def build_report(workdir: str, width: int | None = None) -> dict:
  """Writes the figures and summary.md; returns {'path', 'layers', 'steps'}."""
  traces_dir = os.path.join(workdir, 'traces')
  steps = _partitions(traces_dir, 'step')
  if not steps:
    raise FileNotFoundError(
        f'{traces_dir}: no traces; write them with python -m moe_jax.main '
        '--config=... --workdir=DIR --mode=trace')
  layers = _partitions(traces_dir, 'layer')
  final = steps[-1]
  frames = {layer: trace_lib.read_trace(traces_dir, step=final, layer=layer)
            for layer in layers}
  width = width or max(infer_width(f) for f in frames.values())
  out_dir = os.path.join(workdir, 'report')
  os.makedirs(out_dir, exist_ok=True)

  frequency = np.stack([metrics.selection_frequency(frames[l], width)
                        for l in layers])                       # [L, E']
  fig, ax = plt.subplots(figsize=(max(6, width * 0.3), 1 + 0.4 * len(layers)))
  image = ax.imshow(frequency, aspect='auto', cmap='viridis')
  ax.set_xlabel('expert (router output id)')
  ax.set_ylabel('layer')
  ax.set_title(f'Selection frequency, step {final}')
  fig.colorbar(image, ax=ax)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, 'frequency.png'))
  plt.close(fig)

  domains = pd.DataFrame({l: metrics.per_domain_entropy(frames[l], width)
                          for l in layers})                    # domain x L
  ax = domains.plot.bar(figsize=(7, 4))
  ax.legend(title='layer')
  ax.set_xlabel('domain')
  ax.set_ylabel('selection entropy / ln E\'')
  ax.set_title(f'Per-domain routing entropy by layer, step {final}')
  ax.figure.tight_layout()
  ax.figure.savefig(os.path.join(out_dir, 'domain_entropy.png'))
  plt.close(ax.figure)

  fig, ax = plt.subplots(figsize=(7, 4))
  for l in layers:
    w = np.abs(metrics.weights(frames[l]))
    w = -np.sort(-w / np.maximum(w.sum(1, keepdims=True), 1e-20), axis=1)
    ax.hist(w[:, 0] - w[:, 1], bins=30, histtype='step', label=f'layer {l}')
  ax.set_xlabel('router margin w(1) - w(2)')
  ax.set_ylabel('tokens')
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, 'margin.png'))
  plt.close(fig)

  rows = []
  for l in layers:
    f = frames[l]
    row = {'layer': l,
           'allocation_entropy': metrics.allocation_entropy(f, width),
           'weight_entropy': metrics.weight_entropy(f),
           'router_margin': metrics.router_margin(f)}
    if any(c.startswith('prob_') for c in f.columns):
      row['h_total'] = metrics.h_total(f)
    row.update(metrics.load_balance(f, width))
    rows.append(row)
  table = pd.DataFrame(rows).set_index('layer')

  lines = [f'# Routing report: {workdir}', '',
           f'Checkpoint step {final} (traced steps: {steps}); router width '
           f"E' = {width}; {len(frames[layers[0]])} tokens per layer.", '',
           '## Per-layer metrics', '', table.to_markdown(floatfmt='.4f'), '',
           '## Per-domain selection entropy (/ ln E\')', '',
           domains.to_markdown(floatfmt='.4f'), '']
  if len(steps) > 1:
    change = pd.DataFrame(
        {l: [metrics.change_rate(
            trace_lib.read_trace(traces_dir, step=a, layer=l),
            trace_lib.read_trace(traces_dir, step=b, layer=l), width)
             for a, b in zip(steps, steps[1:])] for l in layers},
        index=steps[1:])
    ax = change.plot(marker='o', figsize=(7, 4))
    ax.set_xlabel('checkpoint step')
    ax.set_ylabel('expert change rate, %')
    ax.figure.tight_layout()
    ax.figure.savefig(os.path.join(out_dir, 'change_rate.png'))
    plt.close(ax.figure)
    lines += ['## Expert change rate between checkpoints (%)', '',
              change.to_markdown(floatfmt='.2f'), '']
  lines += ['Figures: frequency.png, domain_entropy.png, margin.png' +
            (', change_rate.png' if len(steps) > 1 else '') + '.', '']
  path = os.path.join(out_dir, 'summary.md')
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines))
  return {'path': out_dir, 'layers': layers, 'steps': steps}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--width', type=int, default=None,
                      help="router output width E' (default: inferred)")
  args = parser.parse_args(argv)
  result = build_report(args.workdir, args.width)
  print(f"report: {result['path']} (layers {result['layers']}, steps "
        f"{result['steps']})")


if __name__ == '__main__':
  main()
