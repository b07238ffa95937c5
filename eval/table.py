"""LibMoE's zero-shot comparison table over runs: mean, 95% CI, rank, p-value.

  python -m eval.table --workdir=A --workdir=B ... [--step=N] [--baseline=smoe]
      [--out=DIR]

Reads each workdir's newest zero-shot results file `W/eval/step=<N>.json`
(written by `python -m moe_jax.main --config=... --workdir=W --mode=eval`; with
--step, that step's) and prints the table as Markdown, in the layout of
algorithms.md §8.1:

  Method | PPL | LAMBADA | BLiMP | CBT | HellaSwag | PIQA | ARC | RACE | SIQA
    | CSQA | Avg | Avg rank [| p Avg vs SMoE | p PPL vs SMoE]

Runs with the same router are seeds of one method; when one router was run
from several configs (smoe_154m:tiny and smoe_154m:demo), each config is its
own method. Per method and column: the mean over seeds and, with n >= 2 seeds,
the 95% confidence half-width t_{0.975, n-1} * sd / sqrt(n). Avg is each run's
unweighted mean over its tasks (algorithms.md §7 rule 5), then averaged over
seeds like any column. Avg rank ranks the methods per task by mean accuracy
(1 = best, ties averaged) and averages over the tasks (algorithms.md §9). The
p-values are paired t-tests of Avg and of PPL against the baseline method over
the seeds both have (matched by seed value).

With --out=DIR it also writes, atomically:
  table.md    the Markdown table (as printed)
  table.csv   one row per method: <column>_mean, <column>_ci (fractions, as
              in the results files; PPL as is), avg_rank, p_average, p_ppl
  runs.csv    one row per run (load_results)
  table.png   grouped bars per task and Avg, one bar per method, 95% CI
              error bars

Library use: `summarise(load_results(workdirs))`, then `to_markdown` or
`write_outputs`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import io
import json
import math
import os
import re
import sys

import matplotlib

matplotlib.use('Agg')
# pylint: disable=g-import-not-at-top,wrong-import-position
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

from moe_jax import run_log

FORMAT = 'moe_jax.zero_shot/1'
# Canonical task order and the table's column names (eval_interfaces.md).
TASKS = ('lambada', 'blimp', 'cbt', 'hellaswag', 'piqa', 'arc', 'race',
         'siqa', 'commonsenseqa')
TASK_NAMES = {'lambada': 'LAMBADA', 'blimp': 'BLiMP', 'cbt': 'CBT',
              'hellaswag': 'HellaSwag', 'piqa': 'PIQA', 'arc': 'ARC',
              'race': 'RACE', 'siqa': 'SIQA', 'commonsenseqa': 'CSQA'}
# Router -> the method's name in LibMoE's tables (algorithms.md §8).
METHOD_NAMES = {'smoe': 'SMoE', 'sigmoid': 'σ-MoE', 'xmoe': 'XMoE',
                'cosine': 'Cosine-R', 'perturbed_cosine': 'Perturbed Cosine-R',
                'hyper': 'Hyper-R', 'deepseek_v2': 'DeepSeek-V2',
                'deepseek_v3': 'DeepSeek-V3', 'moe_plus_plus': 'MoE++',
                'tc_moe': 'TC-MoE', 'remoe': 'ReMoE', 'dense': 'Dense'}
CONFIDENCE = 0.95
# Means closer than this (accuracy fractions) rank as ties: float noise of
# averaging must not split equal scores.
_TIE_DECIMALS = 10
_RESULT_FILE = re.compile(r'^step=(\d+)\.json$')
# load_results' columns besides the tasks.
_RUN_COLUMNS = ('method', 'seed', 'workdir', 'step', 'ppl', 'average',
                'router', 'config_name', 'max_examples', 'path')


# ----------------------------------------------------------------------------
# Reading results.

def result_steps(workdir: str) -> dict[int, str]:
  """{step: path} of the workdir's eval/step=<N>.json files."""
  eval_dir = os.path.join(workdir, 'eval')
  if not os.path.isdir(eval_dir):
    return {}
  steps = {}
  for name in os.listdir(eval_dir):
    match = _RESULT_FILE.match(name)
    if match:
      steps[int(match.group(1))] = os.path.join(eval_dir, name)
  return steps


def result_path(workdir: str, step: int | None = None) -> str:
  """The results file of `step` (default: the newest); errors say what to do.

  Raises:
    FileNotFoundError: no such workdir, no results in it, or none at `step`.
  """
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'{workdir}: no such run directory (expected a '
                            'workdir of python -m moe_jax.main)')
  steps = result_steps(workdir)
  if not steps:
    raise FileNotFoundError(
        f'{os.path.join(workdir, "eval")}: no zero-shot results '
        '(expected eval/step=<N>.json); write them with python -m '
        f'moe_jax.main --config=... --workdir={workdir} --mode=eval')
  if step is None:
    return steps[max(steps)]
  if step not in steps:
    raise FileNotFoundError(
        f'{os.path.join(workdir, "eval", f"step={step}.json")}: not found; '
        f'evaluated steps: {sorted(steps)} (run --mode=eval on that '
        'checkpoint, or pick one of them with --step)')
  return steps[step]


def read_result(path: str) -> dict:
  """One results file, checked for the fields the table reads."""
  try:
    with open(path, encoding='utf-8') as f:
      result = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not JSON ({e}); expected a {FORMAT} results '
                     'file') from None
  if not isinstance(result, dict) or result.get('format') != FORMAT:
    got = result.get('format') if isinstance(result, dict) else result
    raise ValueError(f'{path}: format: expected {FORMAT!r}, got {got!r}')
  tasks = result.get('tasks')
  if not isinstance(tasks, dict) or not tasks:
    raise ValueError(f'{path}: tasks: expected a non-empty object of task '
                     f'results, got {tasks!r}')
  for name, task in tasks.items():
    score = task.get('score') if isinstance(task, dict) else None
    if not isinstance(score, (int, float)) or isinstance(score, bool):
      raise ValueError(f'{path}: tasks.{name}.score: expected a number, got '
                       f'{score!r}')
  seed = result.get('seed')
  if not isinstance(seed, int) or isinstance(seed, bool):
    raise ValueError(f'{path}: seed: expected an integer (the run\'s '
                     f'train.seed), got {seed!r}')
  return result


def _ordered_tasks(names) -> list[str]:
  """Canonical tasks first (in TASKS order), then any others, sorted."""
  names = set(names)
  return [t for t in TASKS if t in names] + sorted(names - set(TASKS))


def load_results(workdirs: Sequence[str],
                 step: int | None = None) -> pd.DataFrame:
  """One row per run: its results at `step` (default: each run's newest).

  Args:
    workdirs: run directories holding eval/step=<N>.json.
    step: the checkpoint step to read in every workdir (None: the newest).

  Returns:
    Columns method, seed, workdir, step, ppl, one per task present in any run
    (canonical order; accuracy fractions, NaN where a run lacks the task),
    average (the run's unweighted mean over its tasks), then router,
    config_name, max_examples and path. `method` is the router, or the
    config_name where one router comes from several configs.

  Raises:
    FileNotFoundError: a workdir without (those) results.
    ValueError: a malformed results file, or two runs of one method with the
      same seed.
  """
  if not workdirs:
    raise ValueError('workdirs: expected at least one run directory')
  rows = []
  for workdir in workdirs:
    path = result_path(workdir, step)
    result = read_result(path)
    scores = {name: float(task['score'])
              for name, task in result['tasks'].items()}
    ppl = result.get('ppl')
    config_name = result.get('config_name')
    rows.append({
        'router': result.get('router'),
        'config_name': config_name,
        'seed': result['seed'],
        'workdir': workdir,
        'step': int(result.get('step', _RESULT_FILE.match(
            os.path.basename(path)).group(1))),
        'ppl': math.nan if ppl is None else float(ppl),
        **scores,
        'average': float(np.mean(list(scores.values()))),
        'max_examples': result.get('max_examples'),
        'path': path,
    })
  frame = pd.DataFrame(rows)
  frame.insert(0, 'method', _methods(frame))
  _check_unique_seeds(frame)
  tasks = _ordered_tasks(c for row in rows for c in row
                         if c not in _RUN_COLUMNS)
  columns = (['method', 'seed', 'workdir', 'step', 'ppl'] + tasks
             + ['average', 'router', 'config_name', 'max_examples', 'path'])
  return frame[columns]


def _methods(frame: pd.DataFrame) -> list[str]:
  """Each run's method: its router, or its config where routers collide."""
  fallback = [c if isinstance(c, str) and c else os.path.basename(
      os.path.normpath(w)) for c, w in zip(frame.config_name, frame.workdir)]
  configs_of = {}
  for router, config in zip(frame.router, fallback):
    if isinstance(router, str) and router:
      configs_of.setdefault(router, set()).add(config)
  methods = []
  for router, config in zip(frame.router, fallback):
    if isinstance(router, str) and router and len(configs_of[router]) == 1:
      methods.append(router)
    else:
      methods.append(config)
  return methods


def _check_unique_seeds(frame: pd.DataFrame) -> None:
  duplicated = frame[frame.duplicated(['method', 'seed'], keep=False)]
  if len(duplicated):
    first = duplicated.iloc[0]
    same = duplicated[(duplicated.method == first.method)
                      & (duplicated.seed == first.seed)]
    raise ValueError(
        f'runs {list(same.workdir)} are all method {first.method!r} with seed '
        f'{first.seed}: a method\'s runs must differ in seed (table them '
        'separately)')


# ----------------------------------------------------------------------------
# Summary statistics.

def task_columns(frame: pd.DataFrame) -> list[str]:
  """The task columns of a load_results frame, canonical order."""
  return _ordered_tasks(c for c in frame.columns if c not in _RUN_COLUMNS)


def confidence_half_width(values: Sequence[float]) -> float:
  """t_{0.975, n-1} * sd / sqrt(n) of the non-NaN values; NaN when n < 2."""
  values = np.asarray(values, dtype=float)
  values = values[~np.isnan(values)]
  n = len(values)
  if n < 2:
    return math.nan
  quantile = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)
  return float(quantile * values.std(ddof=1) / math.sqrt(n))


def average_rank(means: pd.DataFrame) -> pd.Series:
  """Mean over columns of each row's rank in that column (1 = highest).

  Ties share the average of their ranks (algorithms.md §9); a method without
  a column is left out of that column's ranking.

  Args:
    means: methods x tasks, higher is better.
  """
  ranks = means.round(_TIE_DECIMALS).rank(axis=0, ascending=False,
                                          method='average')
  return ranks.mean(axis=1)


def paired_p_value(frame: pd.DataFrame, method: str, baseline: str,
                   column: str) -> tuple[float, int]:
  """Paired t-test p-value of `column`, method vs baseline, same seeds.

  Returns:
    (two-sided p-value of scipy.stats.ttest_rel, number of pairs); the
    p-value is NaN with fewer than 2 pairs or when every difference is equal.
  """
  mine = frame[frame.method == method].set_index('seed')[column].dropna()
  base = frame[frame.method == baseline].set_index('seed')[column].dropna()
  seeds = sorted(set(mine.index) & set(base.index))
  if len(seeds) < 2:
    return math.nan, len(seeds)
  differences = mine[seeds].to_numpy() - base[seeds].to_numpy()
  if np.all(differences == differences[0]):
    # ttest_rel: 0/0 (all equal) or +-inf; neither is a test.
    return math.nan, len(seeds)
  result = stats.ttest_rel(mine[seeds].to_numpy(), base[seeds].to_numpy())
  return float(result.pvalue), len(seeds)


def find_baseline(frame: pd.DataFrame, baseline: str | None) -> str | None:
  """The method named `baseline`, else the one method of that router."""
  if baseline is None:
    return None
  methods = list(dict.fromkeys(frame.method))
  if baseline in methods:
    return baseline
  matches = list(dict.fromkeys(frame.method[frame.router == baseline]))
  return matches[0] if len(matches) == 1 else None


def summarise(frame: pd.DataFrame, baseline: str | None = 'smoe'
              ) -> pd.DataFrame:
  """One row per method: the baseline first, then by first appearance.

  Args:
    frame: load_results' runs.
    baseline: the method (or router) the p-values compare against; without
      it among the runs (or None) the p columns are NaN.

  Returns:
    Index `method`; columns label (the table's name), n (seeds), seeds
    ('0,1,2'), steps, max_examples, is_baseline, then per metric m of
    ppl, task_columns(frame) and average: m_mean and m_ci (95% half-width,
    NaN below 2 seeds), then avg_rank, p_average, p_ppl, n_paired (seeds
    shared with the baseline).
  """
  tasks = task_columns(frame)
  base = find_baseline(frame, baseline)
  rows = []
  for method, runs in frame.groupby('method', sort=False):
    runs = runs.sort_values('seed')
    row = {'method': method,
           'label': _label(method),
           'n': len(runs),
           'seeds': ','.join(str(s) for s in runs.seed),
           'steps': ','.join(str(s) for s in sorted(set(runs.step))),
           'max_examples': _uniform(runs.max_examples),
           'is_baseline': method == base}
    for column in ['ppl'] + tasks + ['average']:
      values = runs[column].to_numpy(dtype=float)
      present = values[~np.isnan(values)]
      row[f'{column}_mean'] = (float(present.mean()) if len(present)
                               else math.nan)
      row[f'{column}_ci'] = confidence_half_width(values)
    rows.append(row)
  rows.sort(key=lambda r: not r['is_baseline'])
  summary = pd.DataFrame(rows).set_index('method')
  summary['avg_rank'] = average_rank(
      summary[[f'{t}_mean' for t in tasks]])
  tests = {m: (paired_p_value(frame, m, base, 'average'),
               paired_p_value(frame, m, base, 'ppl'))
           for m in summary.index if base is not None and m != base}
  summary['p_average'] = [tests[m][0][0] if m in tests else math.nan
                          for m in summary.index]
  summary['p_ppl'] = [tests[m][1][0] if m in tests else math.nan
                      for m in summary.index]
  summary['n_paired'] = [tests[m][0][1] if m in tests else 0
                         for m in summary.index]
  return summary


def _label(method: str) -> str:
  return METHOD_NAMES.get(method, method)


def _uniform(values: pd.Series):
  """The one value of `values` (None if absent), or NaN when they differ."""
  distinct = {None if v is None or (isinstance(v, float) and math.isnan(v))
              else v for v in values}
  if len(distinct) != 1:
    return math.nan
  return distinct.pop()


# ----------------------------------------------------------------------------
# Output.

def _summary_tasks(summary: pd.DataFrame) -> list[str]:
  names = [c[:-len('_mean')] for c in summary.columns if c.endswith('_mean')]
  return _ordered_tasks(n for n in names if n not in ('ppl', 'average'))


def _cell(mean: float, ci: float, scale: float) -> str:
  if mean is None or math.isnan(mean):
    return '–'
  text = f'{mean * scale:.2f}'
  if ci is not None and not math.isnan(ci):
    text += f' ± {ci * scale:.2f}'
  return text


def _p_cell(p: float) -> str:
  if p is None or math.isnan(p):
    return '–'
  return '<0.001' if p < 0.001 else f'{p:.3f}'


def caption(summary: pd.DataFrame) -> str:
  """The line above the table: step, examples, seeds, what the columns mean."""
  steps = sorted({s for v in summary.steps.astype(str) for s in v.split(',')},
                 key=int)
  parts = [f"Zero-shot accuracy (%) at step {', '.join(steps)}"]
  examples = summary.max_examples.dropna().unique() if (
      'max_examples' in summary) else []
  if len(examples) == 1 and summary.max_examples.notna().all():
    parts[0] += f', at most {int(examples[0])} examples per task'
  counts = summary.n.astype(int)
  if counts.nunique() == 1:
    n = int(counts.iloc[0])
    parts.append(f'Mean ± 95% CI (Student t, n-1 dof) over n = {n} seeds'
                 if n >= 2 else 'One seed per method')
  else:
    parts.append('Mean ± 95% CI (Student t) over n seeds where n ≥ 2; n = '
                 + ', '.join(f'{label} {n}' for label, n in
                             zip(summary.label, counts)))
  parts.append('PPL: validation perplexity; Avg: mean over the tasks; '
               'Avg rank: mean over the tasks of the rank by mean accuracy '
               '(1 = best, ties averaged)')
  base = summary[summary.is_baseline.astype(bool)]
  if len(base) and summary.p_average.notna().any():
    parts.append(f'p: paired t-test against {base.label.iloc[0]} over the '
                 'seeds both have')
  return '. '.join(parts) + '.'


def to_markdown(summary: pd.DataFrame) -> str:
  """LibMoE's table (algorithms.md §8.1 layout) of a summarise() frame.

  Accuracies in percent with 2 decimals, 'mean ± ci' with 2+ seeds; PPL as
  is. The p columns appear when any method has a p-value. Works on a
  table.csv read back with index_col=0 too.
  """
  tasks = _summary_tasks(summary)
  base = summary[summary.is_baseline.astype(bool)]
  with_p = len(base) > 0 and (summary.p_average.notna().any()
                              or summary.p_ppl.notna().any())
  header = (['Method', 'PPL'] + [TASK_NAMES.get(t, t) for t in tasks]
            + ['Avg', 'Avg rank'])
  if with_p:
    name = base.label.iloc[0]
    header += [f'p Avg vs {name}', f'p PPL vs {name}']
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '---|' * len(header)]
  for _, row in summary.iterrows():
    cells = [str(row.label), _cell(row.ppl_mean, row.ppl_ci, 1.0)]
    cells += [_cell(row[f'{t}_mean'], row[f'{t}_ci'], 100.0) for t in tasks]
    cells += [_cell(row.average_mean, row.average_ci, 100.0),
              _cell(row.avg_rank, math.nan, 1.0)]
    if with_p:
      cells += [_p_cell(row.p_average), _p_cell(row.p_ppl)]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return caption(summary) + '\n\n' + '\n'.join(lines) + '\n'


def plot(summary: pd.DataFrame) -> plt.Figure:
  """Grouped bars: one group per task and Avg, one bar per method, 95% CI."""
  columns = _summary_tasks(summary) + ['average']
  names = [TASK_NAMES.get(t, t) for t in columns[:-1]] + ['Avg']
  methods = len(summary)
  width = 0.8 / methods
  x = np.arange(len(columns))
  fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(columns) * max(
      1.0, methods / 3)), 4.5))
  for i, (_, row) in enumerate(summary.iterrows()):
    means = np.array([row[f'{c}_mean'] for c in columns], float) * 100
    cis = np.nan_to_num(np.array([row[f'{c}_ci'] for c in columns], float)
                        * 100)
    ax.bar(x - 0.4 + width * (i + 0.5), means, width, yerr=cis, capsize=2,
           label=f'{row.label} (n={int(row.n)})')
  ax.set_xticks(x, names)
  ax.set_ylabel('accuracy, %')
  ax.set_title('Zero-shot accuracy (mean ± 95% CI over seeds)')
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def write_outputs(summary: pd.DataFrame, frame: pd.DataFrame,
                  out_dir: str) -> dict[str, str]:
  """Writes table.md, table.csv, runs.csv and table.png to `out_dir`.

  Returns:
    {file name: path} of what was written.
  """
  os.makedirs(out_dir, exist_ok=True)
  paths = {name: os.path.join(out_dir, name)
           for name in ('table.md', 'table.csv', 'runs.csv', 'table.png')}
  run_log.write_text_atomic(paths['table.md'], to_markdown(summary))
  run_log.write_text_atomic(paths['table.csv'], summary.to_csv())
  run_log.write_text_atomic(paths['runs.csv'], frame.to_csv(index=False))
  fig = plot(summary)
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=120)
  plt.close(fig)
  run_log.write_bytes_atomic(paths['table.png'], buffer.getvalue())
  return paths


def read_summary(path: str) -> pd.DataFrame:
  """A table.csv written by write_outputs, as summarise() returned it."""
  return pd.read_csv(path, index_col='method',
                     dtype={'seeds': str, 'steps': str, 'label': str})


# ----------------------------------------------------------------------------
# Command line.

class _Parser(argparse.ArgumentParser):
  """argparse whose usage errors are one line and exit 2."""

  def error(self, message):
    self.exit(2, f'{self.prog}: error: {message}\n')


def main(argv: Sequence[str] | None = None) -> int:
  parser = _Parser(prog='python -m eval.table',
                   description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', action='append', default=[],
                      help='a run directory holding eval/step=<N>.json '
                      '(repeat: one per run)')
  parser.add_argument('--step', type=int, default=None,
                      help='read eval/step=<N>.json of every run (default: '
                      'each run\'s newest)')
  parser.add_argument('--baseline', default=None,
                      help='method (router or config name) for the paired '
                      't-tests (default: smoe, when present)')
  parser.add_argument('--out', default=None,
                      help='also write table.md, table.csv, runs.csv and '
                      'table.png here')
  args = parser.parse_args(argv)
  if not args.workdir:
    parser.error('--workdir: expected at least one run directory')
  try:
    frame = load_results(args.workdir, step=args.step)
    baseline = 'smoe' if args.baseline is None else args.baseline
    if (args.baseline is not None
        and find_baseline(frame, args.baseline) is None):
      raise ValueError(f'--baseline={args.baseline}: expected one of the '
                       f'methods {list(dict.fromkeys(frame.method))}')
    summary = summarise(frame, baseline=baseline)
    text = to_markdown(summary)
    paths = write_outputs(summary, frame, args.out) if args.out else {}
  except (OSError, ValueError) as e:
    print(f'{parser.prog}: error: {e}', file=sys.stderr)
    return 2
  sys.stdout.write(text)
  if paths:
    print(f"wrote {', '.join(paths.values())}", file=sys.stderr)
  return 0


if __name__ == '__main__':
  sys.exit(main())
