"""Routing report of a workdir's traces: PNG figures and a Markdown summary.

  python -m moe_jax.analysis.report --workdir=DIR [--width=E']
  python -m moe_jax.analysis.report --workdir=A --workdir=B ... --out=DIR
    (several runs, e.g. one per router: side-by-side comparison in DIR)

Reads `DIR/traces/` (written by `python -m moe_jax.main --mode=trace`) and
writes to `DIR/report/`:
  frequency.png       expert-by-layer selection frequency (newest checkpoint)
  domain_entropy.png  per-domain selection entropy per layer
  domain_overlap.png  expert overlap between domains (tasks), per layer group
  margin.png          histogram of the router margin w_(1) - w_(2) per layer
  change_rate.png     expert change rate between consecutive checkpoints
                      (when more than one checkpoint was traced)
  summary.md          per-layer tables of the metrics of
                      moe_jax.analysis.metrics, layer similarity, and, when
                      computed, DropTop (--mode=droptop) and expert
                      similarity (--mode=similarity)
The comparison writes compare_frequency.png, compare_domain_entropy.png and
compare.md (one row per run) to --out.

VLM traces (moe_jax/analysis/vlm_tracing.py) carry sidecars in the step
directory: `_layers.json` names each layer ('vision/layer_3@scale1',
'projector'), its site and E'; `_domains.json` names the tasks. With them
the tables name layers and tasks, E' comes from the sidecar, the
'Router statistics by site' section gives LibMoE's VLM statistics (means
over the tower's layers and the projector's value, algorithms.md §8.4;
per-task allocation entropy, §9), layer groups are the sites, layer
pairs are compared only where both layers route the same image tokens (an
S² scale's crops and the projector's rows differ), and the change-rate
section adds LibMoE's position-sensitive VLM switch fraction.

Each report is a list of sections (SECTIONS, COMPARE_SECTIONS): a function of
the runs' traces that draws its figures and returns its Markdown, or None
when it has nothing to show (no droptop.json, a single checkpoint). The
Markdown file is the sections' text in order, then the list of their figures.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import dataclasses
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
from moe_jax.analysis import tracing


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
  """E' from the probability columns, else 1 + the largest selected id
  (too small when the last ids were never chosen, e.g. TC-MoE's null slots:
  load_run reads E' from the run's config first, tracing.router_width)."""
  probs = [c for c in frame.columns if c.startswith('prob_')]
  if probs:
    return len(probs)
  return int(metrics.choices(frame).max()) + 1


def run_label(workdir: str) -> str:
  """The run's router from its config.json (else the directory's name)."""
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      config = json.load(f)
    # A VLM's LLM is dense; its tower / projector may still be MoE.
    vlm_moe = 'moe' in (config.get('vlm', {}).get('tower_ffn'),
                        config.get('vlm', {}).get('projector_ffn'))
    if ((vlm_moe or not config.get('model', {}).get('dense_ffn'))
        and 'moe' in config):
      return config['moe']['router']
  return os.path.basename(os.path.normpath(workdir))


@dataclasses.dataclass(frozen=True)
class Section:
  """One part of a Markdown report.

  Attributes:
    markdown: the section's text, from its heading on, without a trailing
      blank line (sections are joined by one).
    figures: names of the PNGs it wrote to the report's directory, in order.
  """
  markdown: str
  figures: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Run:
  """The newest traced checkpoint of one run directory.

  Attributes:
    workdir: the run directory (holding traces/ and, when computed,
      droptop.json and similarity.json).
    label: the run's router (run_label), naming it in a comparison.
    steps: the traced checkpoint steps, sorted.
    frames: layer -> its trace at steps[-1], one row per token.
    width: the router output width E'.
    layer_info: layer -> its `_layers.json` entry (name, site, ...); empty
      for traces without one (LM traces).
    domain_names: domain index -> name, from `_domains.json` (else empty).
  """
  workdir: str
  label: str
  steps: list[int]
  frames: dict[int, pd.DataFrame]
  width: int
  layer_info: dict[int, dict] = dataclasses.field(default_factory=dict)
  domain_names: dict[int, str] = dataclasses.field(default_factory=dict)

  @property
  def layers(self) -> list[int]:
    return sorted(self.frames)

  def layer_name(self, layer: int) -> str:
    """The layer's name from _layers.json, else its index."""
    return self.layer_info.get(layer, {}).get('name', str(layer))

  def groups(self) -> dict[str, list[int]]:
    """Layer groups whose means a report shows: the VLM's sites ('vision
    tower', per S² scale when there are several, 'projector'), else one
    group of all layers."""
    if not self.layer_info:
      return {'all layers': self.layers}
    groups: dict[str, list[int]] = {}
    tower = [l for l in self.layers
             if self.layer_info.get(l, {}).get('site') == 'vision']
    scales = sorted({self.layer_info[l]['scale'] for l in tower})
    if tower:
      groups['vision tower'] = tower
    if len(scales) > 1:
      for scale in scales:
        groups[f'vision tower @scale{scale}'] = [
            l for l in tower if self.layer_info[l]['scale'] == scale]
    for l in self.layers:
      site = self.layer_info.get(l, {}).get('site', 'vision')
      if site != 'vision':
        groups.setdefault(self.layer_name(l), []).append(l)
    return groups

  @property
  def mean_layers(self) -> list[int]:
    """The layers a one-number summary averages: the vision tower's for a
    VLM (LibMoE §8.4: mean over the SigLIP layers), else all."""
    return next(iter(self.groups().values()))

  def domain_label(self, domain: int) -> str:
    return self.domain_names.get(int(domain), str(domain))

  @property
  def final(self) -> int:
    return self.steps[-1]

  def read(self, step: int, layer: int) -> pd.DataFrame:
    """One layer's trace at an earlier step (read on demand, not kept)."""
    return trace_lib.read_trace(os.path.join(self.workdir, 'traces'),
                                step=step, layer=layer)


def _sidecar(traces_dir: str, step: int, name: str):
  """A step's JSON sidecar (vlm_tracing's _layers.json ...), or None."""
  path = os.path.join(traces_dir, f'step={step}', name)
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def load_run(workdir: str, width: int | None = None) -> Run:
  """Reads the newest traced checkpoint of `workdir`. E' if None: from the
  traces' _layers.json (VLM), else the run's config.json, else inferred from
  the traces (infer_width)."""
  traces_dir = os.path.join(workdir, 'traces')
  steps = traced_steps(traces_dir)
  frames = {layer: trace_lib.read_trace(traces_dir, step=steps[-1],
                                        layer=layer)
            for layer in _partitions(traces_dir, 'layer')}
  layer_info = {int(e['layer']): e for e in
                _sidecar(traces_dir, steps[-1], '_layers.json') or []}
  domain_names = dict(enumerate(
      _sidecar(traces_dir, steps[-1], '_domains.json') or []))
  declared = [e['width'] for e in layer_info.values() if e.get('width')]
  width = (width or (max(declared) if declared else None)
           or tracing.router_width(workdir)
           or max(infer_width(f) for f in frames.values()))
  return Run(workdir=workdir, label=run_label(workdir), steps=steps,
             frames=frames, width=width, layer_info=layer_info,
             domain_names=domain_names)


@dataclasses.dataclass(frozen=True)
class Context:
  """What a report's sections read, and where they write their figures.

  Attributes:
    runs: the runs reported on; one for build_report, 2+ for compare_runs.
    out_dir: the report's directory (figures and the Markdown file).
  """
  runs: list[Run]
  out_dir: str

  @property
  def run(self) -> Run:
    """The run of a single-run report."""
    return self.runs[0]

  def save(self, fig: plt.Figure, name: str) -> str:
    """Writes `fig` to out_dir/name and closes it; returns `name`."""
    fig.tight_layout()
    fig.savefig(os.path.join(self.out_dir, name))
    plt.close(fig)
    return name


# A section returns None when it has nothing to show (e.g. no droptop.json).
SectionFn = Callable[[Context], Section | None]


def _block(*paragraphs: str) -> str:
  return '\n\n'.join(paragraphs)


def header_section(ctx: Context) -> Section:
  """Title, and which checkpoint, width and token count the report shows."""
  run = ctx.run
  # A VLM's layers differ (S² crops); an LM's all route the same tokens.
  counts = sorted({len(f) for f in run.frames.values()})
  tokens = (str(counts[0]) if len(counts) == 1
            else f'{counts[0]} to {counts[-1]}')
  return Section(_block(
      f'# Routing report: {run.workdir}',
      f'Checkpoint step {run.final} (traced steps: {run.steps}); router width '
      f"E' = {run.width}; {tokens} tokens per layer."))


def metrics_section(ctx: Context) -> Section:
  """Per-layer metrics table; margin.png, the margins behind router_margin."""
  run = ctx.run
  margins = {l: metrics.margins(run.frames[l]) for l in run.layers}
  figures = ()
  if any(m.size for m in margins.values()):      # K = 1 has no margin
    fig, ax = plt.subplots(figsize=(7, 4))
    for l, values in margins.items():
      ax.hist(values, bins=30, histtype='step',
              label=f'layer {run.layer_name(l)}')
    ax.set_xlabel('router margin w(1) - w(2)')
    ax.set_ylabel('tokens')
    ax.legend()
    figures = (ctx.save(fig, 'margin.png'),)

  rows = []
  for l in run.layers:
    f = run.frames[l]
    row = {'layer': l}
    if run.layer_info:
      row['name'] = run.layer_name(l)
    row.update({
           'allocation_entropy': metrics.allocation_entropy(f, run.width),
           'weight_entropy': metrics.weight_entropy(f),
           'router_margin': metrics.router_margin(f)})
    if any(c.startswith('prob_') for c in f.columns):
      row['h_total'] = metrics.h_total(f)
    row.update(metrics.load_balance(f, run.width))
    rows.append(row)
  table = pd.DataFrame(rows).set_index('layer')
  return Section(_block('## Per-layer metrics',
                        table.to_markdown(floatfmt='.4f')), figures)


def domain_entropy_section(ctx: Context) -> Section:
  """Per-domain selection entropy per layer: table and domain_entropy.png."""
  run = ctx.run
  domains = pd.DataFrame({l: metrics.per_domain_entropy(run.frames[l],
                                                        run.width)
                          for l in run.layers})                # domain x L
  domains.index = [run.domain_label(d) for d in domains.index]
  ax = domains.plot.bar(figsize=(7, 4))
  ax.legend(title='layer', bbox_to_anchor=(1.01, 1), loc='upper left')
  ax.set_xlabel('domain')
  ax.set_ylabel('selection entropy / ln E\'')
  ax.set_title(f'Per-domain routing entropy by layer, step {run.final}')
  png = ctx.save(ax.figure, 'domain_entropy.png')
  return Section(_block('## Per-domain selection entropy (/ ln E\')',
                        domains.to_markdown(floatfmt='.4f')), (png,))


def domain_overlap_section(ctx: Context) -> Section | None:
  """Expert overlap between domains (tasks): histogram intersection of their
  selection frequencies, mean over each layer group; domain_overlap.png."""
  run = ctx.run
  domains = sorted(set().union(*(set(f['domain'].unique())
                                 for f in run.frames.values())))
  if len(domains) < 2:
    return None
  tables = {}
  for group, layers in run.groups().items():
    mean = sum(metrics.domain_overlap(run.frames[l], run.width)
               for l in layers) / len(layers)
    labels = [run.domain_label(d) for d in mean.index]
    tables[group] = pd.DataFrame(mean.to_numpy(), index=labels,
                                 columns=labels)
  fig, axes = plt.subplots(1, len(tables), squeeze=False,
                           figsize=(3.6 * len(tables) + 1, 3.4))
  for ax, (group, table) in zip(axes[0], tables.items()):
    image = ax.imshow(table.to_numpy(), vmin=0, vmax=1, cmap='viridis')
    ax.set_xticks(range(len(table)), labels=table.columns, rotation=90)
    ax.set_yticks(range(len(table)), labels=table.index)
    ax.set_title(group, fontsize=9)
  fig.colorbar(image, ax=axes[0, -1])
  png = ctx.save(fig, 'domain_overlap.png')
  blocks = ['## Expert overlap between domains',
            'Histogram intersection Σ_e min(u_a,e, u_b,e) of two domains\' '
            'selection frequencies (1: the same expert use), mean over the '
            'layers of each group.']
  for group, table in tables.items():
    blocks += [f'{group}:', table.to_markdown(floatfmt='.4f')]
  return Section(_block(*blocks), (png,))


def site_summary_section(ctx: Context) -> Section | None:
  """VLM traces: LibMoE's router statistics per site (algorithms.md §8.4):
  means over the tower's layers and the projector's values, and the
  allocation entropy per task (§9, grouped like LibMoE's MME categories)."""
  run = ctx.run
  if not run.layer_info:
    return None
  rows, per_task = [], {}
  for group, layers in run.groups().items():
    frames = [run.frames[l] for l in layers]
    row = {'site': group, 'layers': len(layers),
           'weight_entropy': np.mean([metrics.weight_entropy(f)
                                      for f in frames]),
           'router_margin': np.mean([metrics.router_margin(f)
                                     for f in frames]),
           'allocation_entropy': np.mean(
               [metrics.allocation_entropy(f, run.width) for f in frames])}
    if all(any(c.startswith('prob_') for c in f.columns) for f in frames):
      row['h_total'] = np.mean([metrics.h_total(f) for f in frames])
    rows.append(row)
    per_task[group] = pd.concat(
        [metrics.per_domain_allocation_entropy(f, run.width)
         for f in frames], axis=1).mean(axis=1)
  tasks = pd.DataFrame(per_task)
  tasks.index = [run.domain_label(d) for d in tasks.index]
  k = metrics.choices(run.frames[run.layers[0]]).shape[1]
  return Section(_block(
      '## Router statistics by site',
      f'Means over the layers of each site (LibMoE reports the vision '
      f'tower\'s mean and the projector\'s value). Weight entropy in nats '
      f'(maximum ln k = {np.log(k):.3f}); allocation entropy / ln E\'.',
      pd.DataFrame(rows).to_markdown(index=False, floatfmt='.4f'),
      'Allocation entropy per task (/ ln E\', mean over the site\'s '
      'layers):',
      tasks.to_markdown(floatfmt='.4f')))


def layer_similarity_section(ctx: Context) -> Section:
  """Overlap of layers' selection frequencies, drawn in frequency.png."""
  run, layers = ctx.run, ctx.run.layers
  frequency = np.stack([metrics.selection_frequency(run.frames[l], run.width)
                        for l in layers])                       # [L, E']
  fig, ax = plt.subplots(figsize=(max(6, run.width * 0.3),
                                  1 + 0.4 * len(layers)))
  image = ax.imshow(frequency, aspect='auto', cmap='viridis')
  ax.set_xlabel('expert (router output id)')
  ax.set_ylabel('layer')
  ax.set_yticks(range(len(layers)),
                labels=[run.layer_name(l) for l in layers])
  ax.set_title(f'Selection frequency, step {run.final}')
  fig.colorbar(image, ax=ax)
  png = ctx.save(fig, 'frequency.png')
  if len(layers) == 1:
    return Section(_block('## Layer similarity', 'One layer: no layer pairs.'),
                   (png,))
  overlap = metrics.layer_overlap(frequency)
  # Token-level comparisons need both layers to route the same tokens (not
  # so across a VLM's S² scales or between the tower and the projector).
  pairs = pd.DataFrame([
      {'layers': f'{a}-{b}',
       'token_jaccard': metrics.token_jaccard(run.frames[a], run.frames[b]),
       'layer_sel_overlap': metrics.layer_sel_overlap(run.frames[b],
                                                      run.frames[a])}
      for a, b in zip(layers, layers[1:])
      if _same_tokens(run.frames[a], run.frames[b])])
  tables = [pd.DataFrame(overlap, index=layers, columns=layers).to_markdown(
      floatfmt='.4f')]
  if len(pairs):
    tables.append(pairs.to_markdown(index=False, floatfmt='.4f'))
  names = ([', '.join(f'{l} = {run.layer_name(l)}' for l in layers)]
           if run.layer_info else [])
  return Section(_block(
      '## Layer similarity',
      'Histogram intersection of selection frequencies '
      f'(universal score {metrics.universal_score(overlap):.4f}, '
      f'optimist score {metrics.optimist_score(overlap):.4f}):',
      *names, *tables), (png,))


def _same_tokens(a: pd.DataFrame, b: pd.DataFrame) -> bool:
  """Whether two layers' traces cover the same (sequence, position)s."""
  key = ['sequence', 'position']
  return len(a) == len(b) and a.sort_values(key)[key].reset_index(
      drop=True).equals(b.sort_values(key)[key].reset_index(drop=True))


def change_rate_section(ctx: Context) -> Section | None:
  """Expert change rate between consecutive checkpoints (2+ traced)."""
  run = ctx.run
  if len(run.steps) == 1:
    return None
  change = pd.DataFrame(
      {l: [metrics.change_rate(run.read(a, l), run.read(b, l), run.width)
           for a, b in zip(run.steps, run.steps[1:])] for l in run.layers},
      index=run.steps[1:])
  ax = change.plot(marker='o', figsize=(7, 4))
  ax.set_xlabel('checkpoint step')
  ax.set_ylabel('expert change rate, %')
  png = ctx.save(ax.figure, 'change_rate.png')
  blocks = ['## Expert change rate between checkpoints (%)',
            change.to_markdown(floatfmt='.2f')]
  if run.layer_info:
    # LibMoE's VLM measure is per slot position, not per (token, expert)
    # pair (algorithms.md §9): a reordering of the same experts counts.
    switch = pd.DataFrame(
        {run.layer_name(l): [metrics.switch_fraction(run.read(a, l),
                                                     run.read(b, l))
                             for a, b in zip(run.steps, run.steps[1:])]
         for l in run.layers}, index=run.steps[1:])
    blocks += ["Switch fraction (LibMoE's VLM average_switch_fraction: "
               'share of slot positions whose expert changed):',
               switch.to_markdown(floatfmt='.4f')]
  return Section(_block(*blocks), (png,))


def saturation_section(ctx: Context) -> Section | None:
  """% of the newest checkpoint's choices already made at each (2+ traced)."""
  run = ctx.run
  if len(run.steps) == 1:
    return None
  saturation = pd.DataFrame(
      {l: [metrics.saturation(run.read(c, l), run.frames[l], run.width)
           for c in run.steps] for l in run.layers}, index=run.steps)
  return Section(_block(f'## Router saturation against step {run.final} (%)',
                        saturation.to_markdown(floatfmt='.2f')))


def droptop_section(ctx: Context) -> Section | None:
  """The DropTop table of --mode=droptop, when it was run."""
  drops = droptop.read_droptop(ctx.run.workdir)
  if drops is None:
    return None
  return Section(_block(
      f'## DropTop (step {int(drops.step.iloc[0])}, validation set)',
      drops.drop(columns='step').to_markdown(index=False, floatfmt='.4f')))


def expert_similarity_section(ctx: Context) -> Section | None:
  """The expert ANI / CKA table of --mode=similarity, when it was run."""
  sims = similarity.read_similarity(ctx.run.workdir)
  if sims is None:
    return None
  return Section(_block(
      f'## Expert similarity (step {int(sims.step.iloc[0])})',
      'ANI: mean pairwise cosine of hidden units (W_in, W_out) and '
      'router expert rows; cka_mean: mean linear CKA between experts\' '
      'outputs on the layer inputs.',
      sims.drop(columns='step').set_index('layer').to_markdown(
          floatfmt='.4f')))


# summary.md, in order; the list of figures ends it.
SECTIONS: list[SectionFn] = [
    header_section,
    metrics_section,
    site_summary_section,
    domain_entropy_section,
    domain_overlap_section,
    layer_similarity_section,
    change_rate_section,
    saturation_section,
    droptop_section,
    expert_similarity_section,
]


def render(ctx: Context, sections: Sequence[SectionFn],
           footer: Sequence[str] = ()) -> str:
  """Markdown of the sections that have something to show.

  Args:
    ctx: what the sections read; their figures go to ctx.out_dir.
    sections: section functions, in order; those returning None are left out.
    footer: paragraphs after the list of the sections' figures.

  Returns:
    The sections' Markdown, then 'Figures: ...' (when any was written) and
    the footer, one blank line apart.
  """
  shown = [s for s in (fn(ctx) for fn in sections) if s is not None]
  blocks = [s.markdown for s in shown]
  figures = [name for s in shown for name in s.figures]
  if figures:
    blocks.append(f"Figures: {', '.join(figures)}.")
  return _block(*blocks, *footer) + '\n'


def build_report(workdir: str, width: int | None = None,
                 sections: Sequence[SectionFn] | None = None) -> dict:
  """Writes the figures and summary.md of `workdir`'s newest traces.

  Args:
    workdir: the run directory; reads workdir/traces, writes workdir/report.
    width: the router output width E' (default: inferred from the traces).
    sections: what summary.md shows, in order (default: SECTIONS).

  Returns:
    {'path': the report directory, 'layers', 'steps': those traced}.
  """
  run = load_run(workdir, width)
  out_dir = os.path.join(workdir, 'report')
  os.makedirs(out_dir, exist_ok=True)
  ctx = Context(runs=[run], out_dir=out_dir)
  text = render(ctx, SECTIONS if sections is None else sections)
  with open(os.path.join(out_dir, 'summary.md'), 'w', encoding='utf-8') as f:
    f.write(text)
  return {'path': out_dir, 'layers': run.layers, 'steps': run.steps}


def comparison_table_section(ctx: Context) -> Section:
  """Layer-mean metrics, one row per run; compare_frequency.png per run."""
  fig, axes = plt.subplots(len(ctx.runs), 1, squeeze=False,
                           figsize=(8, 1.6 * len(ctx.runs) + 1))
  for ax, run in zip(axes[:, 0], ctx.runs):
    freq = np.stack([metrics.selection_frequency(run.frames[l], run.width)
                     for l in run.layers])
    image = ax.imshow(freq, aspect='auto', cmap='viridis')
    ax.set_title(f'{run.label} (step {run.final})', fontsize=9)
    ax.set_ylabel('layer')
    ax.set_yticks(range(len(run.layers)), labels=run.layers)
    fig.colorbar(image, ax=ax)
  axes[-1, 0].set_xlabel('expert (router output id)')
  fig.suptitle('Selection frequency per layer')
  png = ctx.save(fig, 'compare_frequency.png')

  rows = []
  for run in ctx.runs:
    frames, width = [run.frames[l] for l in run.mean_layers], run.width
    row = {'run': run.label, 'step': run.final, "E'": width,
           'allocation_entropy': np.mean([metrics.allocation_entropy(f, width)
                                          for f in frames]),
           'weight_entropy': np.mean([metrics.weight_entropy(f)
                                      for f in frames]),
           'router_margin': np.mean([metrics.router_margin(f)
                                     for f in frames]),
           'load_cv': np.mean([metrics.load_balance(f, width)['load_cv']
                               for f in frames])}
    drops = droptop.read_droptop(run.workdir)
    if drops is not None:
      by_name = drops.set_index('name')
      row['valid_loss'] = by_name.loss['intact']
      for name in ('DropTop-1', 'DropTop-1&2'):
        if name in by_name.index:
          row[f'{name} Δloss'] = by_name.delta_loss[name]
    rows.append(row)
  return Section(_block(
      '# Routing comparison',
      'Layer means of the newest traced checkpoint of each run (a VLM: '
      'over its vision tower\'s layers, as LibMoE); per-domain entropy is '
      'the mean over the same layers.',
      pd.DataFrame(rows).to_markdown(index=False, floatfmt='.4f')), (png,))


def comparison_domain_entropy_section(ctx: Context) -> Section:
  """Per-domain entropy (mean over layers) per run; its bar chart."""
  domains = pd.DataFrame({
      run.label: pd.concat(
          [metrics.per_domain_entropy(run.frames[l], run.width)
           for l in run.mean_layers], axis=1).mean(axis=1).rename(
               run.domain_label)
      for run in ctx.runs})
  ax = domains.plot.bar(figsize=(7, 4), rot=0)
  ax.legend(title='router', bbox_to_anchor=(1.01, 1), loc='upper left')
  ax.set_xlabel('domain')
  ax.set_ylabel("selection entropy / ln E' (mean over layers)")
  ax.set_title('Per-domain routing entropy by router')
  png = ctx.save(ax.figure, 'compare_domain_entropy.png')
  return Section(_block('## Per-domain selection entropy (/ ln E\')',
                        domains.to_markdown(floatfmt='.4f')), (png,))


# compare.md, in order; the figures and the runs' directories end it.
COMPARE_SECTIONS: list[SectionFn] = [
    comparison_table_section,
    comparison_domain_entropy_section,
]


def compare_runs(workdirs: list[str], out_dir: str,
                 sections: Sequence[SectionFn] | None = None) -> dict:
  """Side-by-side figures and tables of several runs' newest traces.

  Args:
    workdirs: 2+ run directories, each with traces/ (width inferred).
    out_dir: where compare.md and the sections' figures go.
    sections: what compare.md shows, in order (default: COMPARE_SECTIONS:
      compare_frequency.png, a frequency heatmap per run, and
      compare_domain_entropy.png, per-domain entropy per run).

  Returns:
    {'path': out_dir, 'runs': the runs' labels}.
  """
  if len(workdirs) < 2:
    raise ValueError(f'compare_runs: needs at least 2 workdirs, got '
                     f'{len(workdirs)}')
  ctx = Context(runs=[load_run(w) for w in workdirs], out_dir=out_dir)
  os.makedirs(out_dir, exist_ok=True)
  runs_line = 'Runs: ' + ', '.join(f'{r.label} = {r.workdir}'
                                   for r in ctx.runs)
  text = render(ctx, COMPARE_SECTIONS if sections is None else sections,
                footer=[runs_line])
  with open(os.path.join(out_dir, 'compare.md'), 'w', encoding='utf-8') as f:
    f.write(text)
  return {'path': out_dir, 'runs': [r.label for r in ctx.runs]}


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
