"""lm-eval's numbers beside the native LibMoE-rule scores, on the same items.

  python -m eval.lm_eval_compare --workdir=W [--step=N] [--limit=100]
      [--tasks=lambada_local,blimp_local,piqa_local,arc_local,race_local,
       siqa_local,commonsenseqa_local] [--batch_size=32] [--max_len=L]
      [--data_dir=D] [--json=rows.json] [--all_rows]

Runs lm-eval's simple_evaluate with the 'moe_jax' model (eval/
lm_eval_adapter.py) on the offline tasks of eval/lm_eval_tasks/, then scores
the same questions (the first `limit` items of each task or group, which is
what lm-eval's --limit takes; not the evenly spaced subset of
config.eval.max_examples) the native way (eval/tasks/, eval/multiple_choice.py,
eval/lambada.py) with the same TextScorer, and prints per task:

  lm acc / lm acc_norm   lm-eval's metrics;
  LibMoE                 the native score under LibMoE's rule (sum for
                         BLiMP, per-token mean for the other multiple-choice
                         tasks, greedy last word for LAMBADA; a tie is
                         wrong; a group is the mean of its parts);
  native acc / acc_norm  lm-eval's two rules recomputed from the native
                         log-likelihoods (first maximum wins): equal to lm
                         acc / acc_norm when the two evaluators score the same
                         token sequences;
  tok first-max          LibMoE's per-token rule with lm-eval's tie rule:
                         differs from LibMoE by the ties only;
  ties                   items whose label ties the best option (LibMoE rule);
  max|dll|               the largest difference between lm-eval's and the
                         native log-likelihood of an option.

EXPLANATION (printed under the table) lists every reason the numbers of the
two evaluators differ. Library use: `compare(run_lm_eval(lm, tasks, limit),
run_native(lm.text_scorer, leaf_tasks(results), counts(results), data_dir))`.

The data folder: --data_dir, else $MOE_JAX_LM_EVAL_DATA, else
<repo>/../shared/data/lm_eval; both evaluators read it.

Dimension legend: N items of a task, O options of an item.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
from typing import Any, Sequence

import lm_eval
from lm_eval.tasks import TaskManager
import numpy as np

from eval import lambada as lambada_lib
from eval import lm_eval_adapter
from eval import multiple_choice as mc
from eval import tasks as tasks_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TASK_DIR = REPO / 'eval' / 'lm_eval_tasks'
DATA_ENV = 'MOE_JAX_LM_EVAL_DATA'
DEFAULT_TASKS = ('lambada_local', 'blimp_local', 'piqa_local', 'arc_local',
                 'race_local', 'siqa_local', 'commonsenseqa_local')
# Leaf lm-eval task -> (native task of eval.tasks.TASKS, native group).
# BLiMP paradigms ('blimp_local_<paradigm>') are mapped by native_source.
LEAVES = {
    'lambada_local': ('lambada', 'lambada'),
    'piqa_local': ('piqa', 'piqa'),
    'arc_easy_local': ('arc', 'easy'),
    'arc_challenge_local': ('arc', 'challenge'),
    'race_high_local': ('race', 'high'),
    'race_middle_local': ('race', 'middle'),
    'siqa_local': ('siqa', 'siqa'),
    'commonsenseqa_local': ('commonsenseqa', 'commonsenseqa'),
}
BLIMP_PREFIX = 'blimp_local_'
# The YAMLs' target_delimiter (' ' + choice); lm-eval's acc_norm divides by
# the characters of the choice without it. Other tasks: ''.
TARGET_DELIMITERS = {'piqa': ' ', 'arc': ' ', 'race': ' ', 'siqa': ' ',
                     'commonsenseqa': ' '}

EXPLANATION = """\
Where lm-eval's numbers differ from LibMoE's rule (same items, same token
sequences, same log-likelihoods):
 1. Rule. LibMoE ranks PIQA/ARC/RACE/SIQA/CSQA options by the MEAN log-prob
    per option TOKEN ('norm'); lm-eval's acc ranks by the SUM of the option's
    log-probs (favours short options) and acc_norm by the sum divided by the
    option's CHARACTERS (without the ' ' delimiter). Neither lm-eval metric
    is LibMoE's; compare 'LibMoE' with 'tok first-max'.
 2. Ties. lm-eval's argmax takes the FIRST maximum, so a tie with the label
    first counts right; LibMoE counts any tie wrong ('ties' column; the
    difference between 'tok first-max' and 'LibMoE').
 3. BLiMP. LibMoE's 'sum' rule scores the whole sequence (context_logprob +
    logprob); lm-eval's acc the sentence tokens only. The context is the
    shared document-start prefix, so the rankings agree, except when a
    sentence plus the prefix is longer than max_len + 1 tokens: the scorer
    then drops prefix tokens from the front of the longer sentence only,
    and the sum rule compares unequal contexts (seen with the :tiny
    config's max_len 64; not with a real context length). The same holds
    for ANY 'sum' task whose context + option exceeds max_len + 1 tokens,
    notably CBT (20 sentences of context): each option's context is
    left-truncated on its own (moe_jax/loglikelihood.py _window), so a
    longer option loses more context tokens, its context_logprob covers
    fewer tokens, and 'sum' then favours it. Keep max_len above CBT's
    longest item, or read such CBT numbers as approximate.
 4. Groups. LibMoE reports a task as the unweighted mean of its groups (ARC
    easy/challenge, RACE high/middle, 67 BLiMP paradigms); the *_local
    groups aggregate the same way (weight_by_size: false), but lm-eval's
    built-in race is high only and its blimp group is the same mean.
 5. LAMBADA. lm-eval's acc asks whether every token of ' ' + word is the
    argmax (is_greedy); LibMoE detokenises the greedy tokens and compares
    the stripped word, so other tokenisations of the same word count right.
    lm-eval's perplexity is exp(-mean over passages of the word's total
    log-prob); LibMoE's perplexity ('libmoe_perplexity') is exp of the mean
    over passages of the word's mean cross-entropy per token; last_word_ppl
    is exp of the mean over all word tokens (token-weighted). The passage
    is split at the last whitespace (lm-eval's lambada_openai splits at the
    last ' ', which differs for 7 of 5,153 passages; lambada_local splits
    LibMoE's way).
 6. Prompts of lm-eval's own tasks (not the *_local ones, which use LibMoE's):
    siqa 'Q: ... A:', commonsense_qa scores letters, race packs earlier
    questions of the passage; CBT and HellaSwag's LibMoE preprocessing are
    not reproduced here.
 7. Subsets. --limit N takes the first N items of each task (also here);
    config.eval.max_examples takes N evenly spaced items per group.
 8. Tokenisation. lm-eval encodes context + continuation together and
    splits; the adapter encodes them separately (LibMoE) and puts the
    document-start prefix before every context, so lm-eval's numbers for a
    moe_jax model are not those of lm-eval's HF path on an exported copy.
"""


def default_data_dir() -> str:
  """$MOE_JAX_LM_EVAL_DATA, else <repo>/../shared/data/lm_eval (the rule of
  eval/lm_eval_tasks/utils.py)."""
  return os.environ.get(DATA_ENV) or str(
      REPO.parent / 'shared' / 'data' / 'lm_eval')


def native_source(leaf: str) -> tuple[str, str]:
  """(native task, native group) of a leaf lm-eval task."""
  if leaf in LEAVES:
    return LEAVES[leaf]
  if leaf.startswith(BLIMP_PREFIX):
    return 'blimp', leaf[len(BLIMP_PREFIX):]
  raise ValueError(f'lm-eval task {leaf!r} has no native counterpart; '
                   f'known: {sorted(LEAVES)} and {BLIMP_PREFIX}<paradigm>')


def run_lm_eval(lm, tasks: Sequence[str], *, limit: int | None,
                include_path: str | os.PathLike = TASK_DIR,
                bootstrap_iters: int = 0) -> dict[str, Any]:
  """lm-eval's simple_evaluate with samples logged.

  bootstrap_iters=0: no bootstrapped stderr (lm-eval would fork a process
  pool from this JAX process for perplexity's).
  """
  return lm_eval.simple_evaluate(
      model=lm, tasks=list(tasks), limit=limit or None, log_samples=True,
      bootstrap_iters=bootstrap_iters,
      task_manager=TaskManager(include_path=str(include_path)))


def leaf_tasks(lm_eval_results: dict[str, Any]) -> list[str]:
  """The leaf tasks lm-eval scored (its samples' keys), in its order."""
  return list(lm_eval_results['samples'])


def counts(lm_eval_results: dict[str, Any]) -> dict[str, int]:
  """Items lm-eval scored per leaf task."""
  return {leaf: len(samples)
          for leaf, samples in lm_eval_results['samples'].items()}


@dataclasses.dataclass
class NativeTask:
  """The native evaluator's view of one leaf task's items."""
  leaf: str
  native: str                # key of eval.tasks.TASKS
  rule: str                  # 'sum' | 'norm' | 'greedy_last_word'
  items: list                # [N] Item (LambadaItem for LAMBADA)
  scores: list               # [N][O] moe_jax.loglikelihood.Score
  entry: dict[str, Any]      # the results-file entry, LibMoE's rule

  def pairs(self) -> list[tuple[str, str]]:
    if self.rule == lambada_lib.RULE:
      return [(i.context, i.continuation) for i in self.items]
    return [(i.context, o) for i in self.items for o in i.options]


class _Replay:
  """A text scorer that answers from scores already computed (so that the
  native rules of eval/ run unchanged on one batched scorer call)."""

  def __init__(self, table: dict[tuple[str, str], Any], decode, encode):
    self._table, self.decode, self.encode = table, decode, encode

  def loglikelihood(self, pairs, *, desc: str = ''):
    del desc
    return [self._table[p] for p in pairs]


def run_native(text_scorer, leaves: Sequence[str], n_items: dict[str, int],
               data_root: str) -> dict[str, NativeTask]:
  """The first n_items[leaf] native items of each leaf task, scored in ONE
  TextScorer call, and LibMoE's entry of each.

  Args:
    text_scorer: eval.text_scorer.TextScorer (the adapter's text_scorer).
    leaves: leaf lm-eval task names.
    n_items: how many items of each leaf to take (lm-eval's count).
    data_root: the folder with one folder per task.
  """
  loaded: dict[str, list] = {}
  chosen = {}
  for leaf in leaves:
    native, group = native_source(leaf)
    spec = tasks_lib.TASKS[native]
    if native not in loaded:
      loaded[native] = spec.load(os.path.join(data_root, spec.subdir))
    items = [i for i in loaded[native] if i.group == group][:n_items[leaf]]
    if len(items) < n_items[leaf]:
      raise ValueError(f'{leaf}: lm-eval scored {n_items[leaf]} items but '
                       f'the native {native} group {group!r} has '
                       f'{len(items)}')
    chosen[leaf] = NativeTask(leaf, native, spec.rule, items, [], {})
  pairs = sorted({p for task in chosen.values() for p in task.pairs()})
  table = dict(zip(pairs, text_scorer.loglikelihood(pairs,
                                                    desc='native')))
  replay = _Replay(table, text_scorer.decode, text_scorer.encode)
  for task in chosen.values():
    if task.rule == lambada_lib.RULE:
      task.scores = [[table[p]] for p in task.pairs()]
      task.entry = lambada_lib.evaluate(task.items, replay, desc=task.leaf)
    else:
      task.scores = [[table[(i.context, o)] for o in i.options]
                     for i in task.items]
      task.entry = mc.evaluate_items(task.items, replay, task.rule,
                                     desc=task.leaf)
  return chosen


def _first_max_accuracy(values: list[np.ndarray], labels: list[int]
                        ) -> float:
  return float(np.mean([int(np.argmax(v)) == y
                        for v, y in zip(values, labels)]))


def _metric(results: dict[str, Any], task: str, name: str) -> float | None:
  value = results['results'].get(task, {}).get(f'{name},none')
  return None if value is None else float(value)


def _leaf_row(task: NativeTask, results: dict[str, Any]) -> dict[str, Any]:
  samples = sorted(results['samples'][task.leaf], key=lambda s: s['doc_id'])
  lm_pairs = [tuple(a[:2]) for s in samples for a in s['arguments']]
  lm_lls = [float(r[0][0]) for s in samples for r in s['resps']]
  native_lls = [float(s.logprob) for item in task.scores for s in item]
  row = {
      'task': task.leaf, 'native_task': task.native, 'n': len(task.items),
      'rule': task.rule,
      'lm_acc': _metric(results, task.leaf, 'acc'),
      'lm_acc_norm': _metric(results, task.leaf, 'acc_norm'),
      'libmoe': task.entry['score'],
      'aligned': lm_pairs == task.pairs(),
      'max_abs_dll': (max(abs(a - b) for a, b in zip(lm_lls, native_lls))
                      if len(lm_lls) == len(native_lls) else math.nan),
  }
  if task.rule == lambada_lib.RULE:
    row['native_acc'] = task.entry['is_greedy_accuracy']
    row['lm_perplexity'] = _metric(results, task.leaf, 'perplexity')
    row['native_last_word_ppl'] = task.entry['last_word_ppl']
    return row
  labels = [i.label for i in task.items]
  sums = [np.array([s.logprob for s in item]) for item in task.scores]
  delimiter = TARGET_DELIMITERS.get(task.native, '')
  chars = [np.array([len(o) - len(delimiter) for o in i.options], float)
           for i in task.items]
  rule_scores = [np.array(mc.option_scores(item, task.rule))
                 for item in task.scores]
  row['native_acc'] = _first_max_accuracy(sums, labels)
  row['native_acc_norm'] = _first_max_accuracy(
      [s / c for s, c in zip(sums, chars)], labels)
  row['rule_first_max'] = _first_max_accuracy(rule_scores, labels)
  row['ties'] = int(sum(
      int(v[y] == v.max() and (v == v.max()).sum() > 1)
      for v, y in zip(rule_scores, labels)))
  return row


def _mean(values: list) -> float | None:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def compare(lm_eval_results: dict[str, Any],
            native: dict[str, NativeTask]) -> list[dict[str, Any]]:
  """One row per leaf task, then one per lm-eval group (its parts averaged
  without weights, LibMoE's group_average).

  Args:
    lm_eval_results: simple_evaluate's output with samples (log_samples).
    native: run_native's output for the same leaf tasks.

  Returns:
    Rows with task, n, rule, lm_acc, lm_acc_norm, libmoe, native_acc,
    native_acc_norm, rule_first_max, ties, max_abs_dll, aligned (LAMBADA:
    lm_perplexity and native_last_word_ppl instead of the norm columns);
    group rows have group=True and parts.
  """
  rows = [_leaf_row(task, lm_eval_results) for task in native.values()]
  by_task = {row['task']: row for row in rows}
  for group, parts in lm_eval_results.get('group_subtasks', {}).items():
    parts = [p for p in parts if p in by_task]
    if not parts:
      continue
    members = [by_task[p] for p in parts]
    row = {'task': group, 'group': True, 'parts': parts,
           'n': sum(m['n'] for m in members), 'rule': members[0]['rule'],
           'lm_acc': _metric(lm_eval_results, group, 'acc'),
           'lm_acc_norm': _metric(lm_eval_results, group, 'acc_norm'),
           'aligned': all(m['aligned'] for m in members),
           'max_abs_dll': max(m['max_abs_dll'] for m in members),
           'ties': sum(m.get('ties', 0) for m in members)}
    for key in ('libmoe', 'native_acc', 'native_acc_norm', 'rule_first_max'):
      row[key] = _mean([m.get(key) for m in members])
    rows.append(row)
  return rows


def format_table(rows: Sequence[dict[str, Any]], *, all_rows: bool = False
                 ) -> str:
  """Markdown table of compare's rows, accuracies in percent. BLiMP
  paradigm rows are left out unless all_rows."""
  def pct(value):
    return '' if value is None else f'{100 * value:.2f}'

  header = ('| task | n | lm acc | lm acc_norm | LibMoE (rule) | native acc '
            '| native acc_norm | tok first-max | ties | max|dll| | same '
            'items |')
  lines = [header, '|' + '---|' * 11]
  for row in rows:
    if (not all_rows and not row.get('group')
        and row['task'].startswith(BLIMP_PREFIX)):
      continue
    rule = row['rule']
    has_norm = row.get('lm_acc_norm') is not None
    first_max = row.get('rule_first_max') if rule == 'norm' else None
    lines.append(
        f"| {row['task']} | {row['n']} | {pct(row['lm_acc'])} | "
        f"{pct(row.get('lm_acc_norm'))} | {pct(row['libmoe'])} ({rule}) | "
        f"{pct(row.get('native_acc'))} | "
        f"{pct(row.get('native_acc_norm') if has_norm else None)} "
        f"| {pct(first_max)} | {row.get('ties', '')} | "
        f"{row['max_abs_dll']:.2e} | {'yes' if row['aligned'] else 'NO'} |")
  for row in rows:
    if row['rule'] == lambada_lib.RULE:
      lines.append(f"\n{row['task']}: lm-eval perplexity "
                   f"{row['lm_perplexity']:.4g} (per passage), LibMoE "
                   f"last-word perplexity {row['native_last_word_ppl']:.4g} "
                   '(per token); lm acc = is_greedy, LibMoE = greedy last '
                   'word.')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='moe_jax run dir')
  parser.add_argument('--step', type=int, default=None,
                      help='checkpoint step (default: the newest)')
  parser.add_argument('--tasks', default=','.join(DEFAULT_TASKS),
                      help='lm-eval tasks or groups of eval/lm_eval_tasks, '
                      'comma-separated')
  parser.add_argument('--limit', type=int, default=100,
                      help='first N items per task (0: all)')
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--max_len', type=int, default=None)
  parser.add_argument('--data_dir', default=None,
                      help=f'task data folder (default ${DATA_ENV} or '
                      '<repo>/../shared/data/lm_eval)')
  parser.add_argument('--json', default=None, help='write the rows here')
  parser.add_argument('--all_rows', action='store_true',
                      help='print every BLiMP paradigm too')
  args = parser.parse_args(argv)
  for name in ('HF_HUB_OFFLINE', 'HF_DATASETS_OFFLINE'):
    os.environ.setdefault(name, '1')
  data_root = args.data_dir or default_data_dir()
  os.environ[DATA_ENV] = data_root          # lm-eval's tasks read it too
  lm = lm_eval_adapter.MoEJaxLM(workdir=args.workdir, step=args.step,
                                batch_size=args.batch_size,
                                max_len=args.max_len)
  tasks = [t.strip() for t in args.tasks.split(',') if t.strip()]
  results = run_lm_eval(lm, tasks, limit=args.limit)
  native = run_native(lm.text_scorer, leaf_tasks(results), counts(results),
                      data_root)
  rows = compare(results, native)
  print(f'{args.workdir} step {lm.text_scorer.step}, first {args.limit or "all"} '
        'items per task\n')
  print(format_table(rows, all_rows=args.all_rows))
  print()
  print(EXPLANATION)
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(rows, f, indent=1)
  return 0 if all(row['aligned'] for row in rows) else 1


if __name__ == '__main__':
  sys.exit(main())
