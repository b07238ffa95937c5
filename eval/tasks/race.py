"""RACE reader: race/test/{high,middle}/*.txt (algorithms.md §7).

Each file is one JSON passage {"article", "questions", "options",
"answers"}; every question is an item with prompt 'Article: {article}\n
Question: {question}\nAnswer:' and its 4 options, each ' ' + option,
label 'ABCD'.index(answer). Scored by 'norm'; groups 'high' and 'middle'.

The leading ' ' follows LibMoE's code, not algorithms.md §7's table (which
shows no space): LibMoE's language_modeling/framework/dataset/text/eval/
race.py encodes `sentence_to_indices(" " + o)` for every option o.
"""

from __future__ import annotations

import glob
import json
import os

from eval import multiple_choice as mc

DISPLAY = 'RACE'
GROUPS = ('high', 'middle')
LETTERS = ('A', 'B', 'C', 'D')


def load_passage(path: str, group: str) -> list[mc.Item]:
  """The questions of one passage file."""
  with open(path, encoding='utf-8') as f:
    try:
      r = json.load(f)
    except json.JSONDecodeError as e:
      raise mc.line_error(path, e.lineno, DISPLAY,
                          f'not valid JSON ({e})') from e
  try:
    article = r['article']
    rows = list(zip(r['questions'], r['options'], r['answers'], strict=True))
  except (KeyError, TypeError, ValueError):
    raise ValueError(f'{DISPLAY}: {path}: expected a JSON object with '
                     "'article' and equally long 'questions', 'options' and "
                     "'answers'") from None
  items = []
  for n, (question, options, answer) in enumerate(rows):
    if answer not in LETTERS or len(options) != len(LETTERS):
      raise ValueError(f'{DISPLAY}: {path}: question {n} has answer '
                       f'{answer!r} and {len(options)} options; expected one '
                       f'of {LETTERS} and 4 options')
    items.append(mc.Item(
        group=group,
        context=f'Article: {article}\nQuestion: {question}\nAnswer:',
        # ' ' + option as LibMoE's eval/race.py (see the module docstring).
        options=tuple(' ' + o for o in options),
        label=LETTERS.index(answer)))
  return items


def load(task_dir: str) -> list[mc.Item]:
  """High then middle, passage files in sorted order."""
  items = []
  for group in GROUPS:
    pattern = os.path.join(task_dir, 'test', group, '*.txt')
    paths = sorted(glob.glob(pattern))
    if not paths:
      raise mc.missing_file(pattern, DISPLAY)
    for path in paths:
      items.extend(load_passage(path, group))
  return items
