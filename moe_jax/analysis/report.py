"""Routing report of a workdir's traces: PNG figures and a Markdown summary.

  python -m moe_jax.analysis.report --workdir=DIR [--width=E']
  python -m moe_jax.analysis.report --workdir=A --workdir=B ... --out=DIR
    (several runs, e.g. one per router: side-by-side comparison in DIR)

Reads `DIR/traces/` (written by `python -m moe_jax.main --mode=trace`) and
writes to `DIR/report/`:
  frequency.png       expert-by-layer selection frequency (newest checkpoint)
  domain_entropy.png  per-domain selection entropy per layer
  margin.png          histogram of the router margin w_(1) - w_(2) per layer
  change_rate.png     expert change rate between consecutive checkpoints
                      (when more than one checkpoint was traced)
  summary.md          per-layer tables of the metrics of moe_jax.analysis.metrics,
                      layer similarity, and, when computed, DropTop
                      (--mode=droptop) and expert similarity (--mode=similarity)
The comparison writes compare_frequency.png, compare_domain_entropy.png and
compare.md (one row per run) to --out.
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use('Agg')
# pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from moe_jax import trace as trace_lib
from moe_jax.analysis import droptop
from moe_jax.analysis import metrics
from moe_jax.analysis import similarity


def _partitions(traces_dir: str, name: str) -> list[int]:
  """Sorted values of a hive partition key ('step' or 'layer')."""
  values = set()
  for root, dirs, _ in os.walk(traces_dir):
    for d in dirs:
      if d.startswith(f'{name}='):
        values.add(int(d.split('=', 1)[1]))
  return sorted(values)


def traced_steps(traces_dir: str) -> list[int]:
  """The traced checkpoint steps, sorted; an error says how to make some."""
  steps = _partitions(traces_dir, 'step')
  if not steps:
    raise FileNotFoundError(
        f'{traces_dir}: no traces; write them with python -m moe_jax.main '
        '--config=... --workdir=DIR --mode=trace')
  return steps


def infer_width(frame: pd.DataFrame) -> int:
  """E' from the probability columns, else 1 + the largest selected id."""
  probs = [c for c in frame.columns if c.startswith('prob_')]
  if probs:
    return len(probs)
  return int(metrics.choices(frame).max()) + 1


def build_report(workdir: str, width: int | None = None) -> dict:
  """Writes the figures and summary.md; returns {'path', 'layers', 'steps'}."""
  traces_dir = os.path.join(workdir, 'traces')
  steps = traced_steps(traces_dir)
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
  ax.set_yticks(range(len(layers)), labels=layers)
  ax.set_title(f'Selection frequency, step {final}')
  fig.colorbar(image, ax=ax)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, 'frequency.png'))
  plt.close(fig)

  domains = pd.DataFrame({l: metrics.per_domain_entropy(frames[l], width)
                          for l in layers})                    # domain x L
  ax = domains.plot.bar(figsize=(7, 4))
  ax.legend(title='layer', bbox_to_anchor=(1.01, 1), loc='upper left')
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

  overlap = metrics.layer_overlap(frequency)
  pairs = pd.DataFrame([
      {'layers': f'{a}-{b}',
       'token_jaccard': metrics.token_jaccard(frames[a], frames[b]),
       'layer_sel_overlap': metrics.layer_sel_overlap(frames[b], frames[a])}
      for a, b in zip(layers, layers[1:])])

  lines = [f'# Routing report: {workdir}', '',
           f'Checkpoint step {final} (traced steps: {steps}); router width '
           f"E' = {width}; {len(frames[layers[0]])} tokens per layer.", '',
           '## Per-layer metrics', '', table.to_markdown(floatfmt='.4f'), '',
           '## Per-domain selection entropy (/ ln E\')', '',
           domains.to_markdown(floatfmt='.4f'), '',
           '## Layer similarity', '',
           'Histogram intersection of selection frequencies '
           f'(universal score {metrics.universal_score(overlap):.4f}, '
           f'optimist score {metrics.optimist_score(overlap):.4f}):'
           if len(layers) > 1 else 'One layer: no layer pairs.', '']
  if len(layers) > 1:
    lines += [pd.DataFrame(overlap, index=layers, columns=layers).to_markdown(
        floatfmt='.4f'), '', pairs.to_markdown(index=False, floatfmt='.4f'),
              '']
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
    saturation = pd.DataFrame(
        {l: [metrics.saturation(
            trace_lib.read_trace(traces_dir, step=c, layer=l), frames[l],
            width) for c in steps] for l in layers}, index=steps)
    lines += ['## Expert change rate between checkpoints (%)', '',
              change.to_markdown(floatfmt='.2f'), '',
              f'## Router saturation against step {final} (%)', '',
              saturation.to_markdown(floatfmt='.2f'), '']
  drops = droptop.read_droptop(workdir)
  if drops is not None:
    lines += [f'## DropTop (step {int(drops.step.iloc[0])}, validation set)',
              '', drops.drop(columns='step').to_markdown(index=False,
                                                         floatfmt='.4f'), '']
  sims = similarity.read_similarity(workdir)
  if sims is not None:
    lines += [f'## Expert similarity (step {int(sims.step.iloc[0])})', '',
              'ANI: mean pairwise cosine of hidden units (W_in, W_out) and '
              'router expert rows; cka_mean: mean linear CKA between experts\' '
              'outputs on the layer inputs.', '',
              sims.drop(columns='step').set_index('layer').to_markdown(
                  floatfmt='.4f'), '']
  lines += ['Figures: frequency.png, domain_entropy.png, margin.png' +
            (', change_rate.png' if len(steps) > 1 else '') + '.', '']
  path = os.path.join(out_dir, 'summary.md')
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines))
  return {'path': out_dir, 'layers': layers, 'steps': steps}


def run_label(workdir: str) -> str:
  """The run's router from its config.json (else the directory's name)."""
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      config = json.load(f)
    if not config.get('model', {}).get('dense_ffn') and 'moe' in config:
      return config['moe']['router']
  return os.path.basename(os.path.normpath(workdir))


def compare_runs(workdirs: list[str], out_dir: str) -> dict:
  """Side-by-side figures and a table of several runs' newest traces.

  Writes compare_frequency.png (a frequency heatmap per run),
  compare_domain_entropy.png (per-domain entropy, mean over layers, per run)
  and compare.md to `out_dir`; returns {'path', 'runs'}.
  """
  if len(workdirs) < 2:
    raise ValueError(f'compare_runs: needs at least 2 workdirs, got '
                     f'{len(workdirs)}')
  runs = []
  for workdir in workdirs:
    traces_dir = os.path.join(workdir, 'traces')
    steps = traced_steps(traces_dir)
    frames = {l: trace_lib.read_trace(traces_dir, step=steps[-1], layer=l)
              for l in _partitions(traces_dir, 'layer')}
    width = max(infer_width(f) for f in frames.values())
    runs.append({'workdir': workdir, 'label': run_label(workdir),
                 'step': steps[-1], 'frames': frames, 'width': width})
  os.makedirs(out_dir, exist_ok=True)

  fig, axes = plt.subplots(len(runs), 1, squeeze=False,
                           figsize=(8, 1.6 * len(runs) + 1))
  for ax, run in zip(axes[:, 0], runs):
    frames = run['frames']
    freq = np.stack([metrics.selection_frequency(frames[l], run['width'])
                     for l in sorted(frames)])
    image = ax.imshow(freq, aspect='auto', cmap='viridis')
    ax.set_title(f"{run['label']} (step {run['step']})", fontsize=9)
    ax.set_ylabel('layer')
    ax.set_yticks(range(len(frames)), labels=sorted(frames))
    fig.colorbar(image, ax=ax)
  axes[-1, 0].set_xlabel('expert (router output id)')
  fig.suptitle('Selection frequency per layer')
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, 'compare_frequency.png'))
  plt.close(fig)

  domains = pd.DataFrame({
      run['label']: pd.concat(
          [metrics.per_domain_entropy(f, run['width'])
           for f in run['frames'].values()], axis=1).mean(axis=1)
      for run in runs})
  ax = domains.plot.bar(figsize=(7, 4), rot=0)
  ax.legend(title='router', bbox_to_anchor=(1.01, 1), loc='upper left')
  ax.set_xlabel('domain')
  ax.set_ylabel("selection entropy / ln E' (mean over layers)")
  ax.set_title('Per-domain routing entropy by router')
  ax.figure.tight_layout()
  ax.figure.savefig(os.path.join(out_dir, 'compare_domain_entropy.png'))
  plt.close(ax.figure)

  rows = []
  for run in runs:
    frames, width = run['frames'], run['width']
    row = {'run': run['label'], 'step': run['step'], "E'": width,
           'allocation_entropy': np.mean([metrics.allocation_entropy(f, width)
                                          for f in frames.values()]),
           'weight_entropy': np.mean([metrics.weight_entropy(f)
                                      for f in frames.values()]),
           'router_margin': np.mean([metrics.router_margin(f)
                                     for f in frames.values()]),
           'load_cv': np.mean([metrics.load_balance(f, width)['load_cv']
                               for f in frames.values()])}
    drops = droptop.read_droptop(run['workdir'])
    if drops is not None:
      by_name = drops.set_index('name')
      row['valid_loss'] = by_name.loss['intact']
      for name in ('DropTop-1', 'DropTop-1&2'):
        if name in by_name.index:
          row[f'{name} Δloss'] = by_name.delta_loss[name]
    rows.append(row)
  table = pd.DataFrame(rows)
  lines = ['# Routing comparison', '',
           'Layer means of the newest traced checkpoint of each run; '
           'per-domain entropy is the mean over layers.', '',
           table.to_markdown(index=False, floatfmt='.4f'), '',
           '## Per-domain selection entropy (/ ln E\')', '',
           domains.to_markdown(floatfmt='.4f'), '',
           'Figures: compare_frequency.png, compare_domain_entropy.png.', '',
           'Runs: ' + ', '.join(f"{r['label']} = {r['workdir']}"
                                for r in runs), '']
  with open(os.path.join(out_dir, 'compare.md'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines))
  return {'path': out_dir, 'runs': [r['label'] for r in runs]}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True, action='append',
                      help='a run directory; repeat to compare runs')
  parser.add_argument('--width', type=int, default=None,
                      help="router output width E' (default: inferred)")
  parser.add_argument('--out', default=None,
                      help='output directory of a comparison (2+ workdirs)')
  args = parser.parse_args(argv)
  if len(args.workdir) > 1:
    if not args.out:
      parser.error('--out is required with more than one --workdir')
    result = compare_runs(args.workdir, args.out)
    print(f"comparison: {result['path']} (runs {result['runs']})")
    return
  result = build_report(args.workdir[0], args.width)
  print(f"report: {result['path']} (layers {result['layers']}, steps "
        f"{result['steps']})")


if __name__ == '__main__':
  main()
