"""The nine zero-shot tasks of LibMoE's LM evaluation (algorithms.md §7).

`TASKS` maps each task's name, in the paper's column order, to its
`TaskSpec`: display name, scoring rule, folder under config.eval.data_dir
and reader. `run_task` reads a task, optionally keeps an evenly spaced
subset of each group, scores it with a text scorer and returns the task's
entry of the results file (W/eval/step=<N>.json):

  entry = run_task('piqa', scorer, data_dir, max_examples=100)
  # {'score': 0.55, 'seq_average': 0.55, 'count': 100, 'rule': 'norm',
  #  'groups': {'piqa': {'accuracy': 0.55, 'count': 100}}}

Dimension legend: N items, G groups.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence, TypeVar

from eval import lambada as lambada_lib
from eval import multiple_choice as mc
from eval.tasks import arc
from eval.tasks import blimp
from eval.tasks import cbt
from eval.tasks import commonsenseqa
from eval.tasks import hellaswag
from eval.tasks import lambada
from eval.tasks import piqa
from eval.tasks import race
from eval.tasks import siqa

TASKS_FIELD = 'config.eval.tasks'


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  name: str          # key of TASKS and of the results file's "tasks"
  display: str       # column header of the results table
  rule: str          # 'sum' | 'norm' | 'greedy_last_word' (LAMBADA)
  subdir: str        # the task's folder under config.eval.data_dir
  # task folder -> its items (Item; LAMBADA: eval.lambada.LambadaItem)
  load: Callable[[str], list]


TASKS: dict[str, TaskSpec] = {
    spec.name: spec for spec in (
        TaskSpec('lambada', 'LAMBADA', lambada_lib.RULE, 'lambada',
                 lambada.load),
        TaskSpec('blimp', 'BLiMP', 'sum', 'blimp', blimp.load),
        TaskSpec('cbt', 'CBT', 'sum', 'cbt', cbt.load),
        TaskSpec('hellaswag', 'HellaSwag', 'norm', 'hellaswag',
                 hellaswag.load),
        TaskSpec('piqa', 'PIQA', 'norm', 'piqa', piqa.load),
        TaskSpec('arc', 'ARC', 'norm', 'arc', arc.load),
        TaskSpec('race', 'RACE', 'norm', 'race', race.load),
        TaskSpec('siqa', 'SIQA', 'norm', 'siqa', siqa.load),
        TaskSpec('commonsenseqa', 'CSQA', 'norm', 'commonsenseqa',
                 commonsenseqa.load),
    )
}


def _unknown(name: str) -> ValueError:
  return ValueError(f'{TASKS_FIELD}: unknown task {name!r}; known tasks are '
                    f"{', '.join(TASKS)} (or 'all')")


def get_task(name: str) -> TaskSpec:
  """The TaskSpec of `name` (a task name or display name, any case)."""
  key = name.strip().lower()
  for spec in TASKS.values():
    if key in (spec.name, spec.display.lower()):
      return spec
  raise _unknown(name)


def parse_task_list(text: str) -> list[str]:
  """Task names from config.eval.tasks: 'all' or a comma-separated list.

  Names match case-insensitively, display names too ('CSQA'). The result
  is in the canonical order of TASKS, without repeats, whatever the order
  of the list.

  Raises:
    ValueError naming config.eval.tasks and listing the known tasks for an
    unknown name or an empty list.
  """
  if not isinstance(text, str):
    raise TypeError(f'{TASKS_FIELD} must be a string (\'all\' or names '
                    f'separated by commas), got {type(text).__name__}')
  if text.strip().lower() == 'all':
    return list(TASKS)
  wanted = {get_task(name).name for name in text.split(',') if name.strip()}
  if not wanted:
    raise ValueError(f'{TASKS_FIELD} is empty; give \'all\' or some of '
                     f"{', '.join(TASKS)}, separated by commas")
  return [name for name in TASKS if name in wanted]


ItemT = TypeVar('ItemT')


def subsample(items: Sequence[ItemT], max_examples: int | None
              ) -> list[ItemT]:
  """At most `max_examples` items of each group, evenly spaced in it.

  Within a group of n > m = max_examples items, the items at positions
  floor(j * n / m), j = 0..m-1, are kept. The selection is deterministic
  and the items keep their order. None or 0 keeps everything.

  Args:
    items: anything with a `group` attribute (Item, LambadaItem).
    max_examples: the per-group cap (config.eval.max_examples).
  """
  if not max_examples:
    return list(items)
  if max_examples < 0:
    raise ValueError(f'max_examples must be positive, 0 or None (all), got '
                     f'{max_examples}')
  positions: dict[str, list[int]] = {}
  for i, item in enumerate(items):
    positions.setdefault(item.group, []).append(i)
  keep = set()
  for where in positions.values():
    n = len(where)
    if n <= max_examples:
      keep.update(where)
    else:
      keep.update(where[j * n // max_examples] for j in range(max_examples))
  return [item for i, item in enumerate(items) if i in keep]


def run_task(name: str, scorer: mc.TextScorerProtocol, data_root: str, *,
             max_examples: int | None = None) -> dict[str, Any]:
  """Reads, scores and summarises one task.

  Args:
    name: a key of TASKS.
    scorer: a text scorer (TextScorerProtocol).
    data_root: config.eval.data_dir; the task's files are under
      os.path.join(data_root, TASKS[name].subdir).
    max_examples: per-group cap (see `subsample`); None or 0 for all.

  Returns:
    The task entry of the results file: {'score', 'seq_average', 'count',
    'rule', 'groups': {group: {'accuracy', 'count'}}}, plus LAMBADA's
    'is_greedy_accuracy', 'last_token_accuracy', 'libmoe_perplexity' and
    'last_word_ppl' (eval/lambada.py).
  """
  spec = get_task(name)
  items = subsample(spec.load(os.path.join(data_root, spec.subdir)),
                    max_examples)
  if spec.rule == lambada_lib.RULE:
    return lambada_lib.evaluate(items, scorer, desc=spec.name)
  return mc.evaluate_items(items, scorer, spec.rule, desc=spec.name)
