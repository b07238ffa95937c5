"""CommonsenseQA reader: commonsenseqa/dev_rand_split.jsonl (algorithms.md §7).

The official format {"answerKey", "question": {"stem", "choices":
[{"label", "text"}]}}. Prompt 'Question: {stem}\nAnswer:', options
' ' + each choice text, in label order, the label from answerKey. Scored by
'norm'; one group.

The leading ' ' follows LibMoE's code, not algorithms.md §7's table (which
shows no space): LibMoE's language_modeling/framework/dataset/text/eval/
commonsenseqa.py encodes `sentence_to_indices(" " + c)` for every choice c.
"""

from __future__ import annotations

import os

from eval import multiple_choice as mc

DISPLAY = 'CSQA'
FILE = 'dev_rand_split.jsonl'
GROUP = 'commonsenseqa'


def load(task_dir: str) -> list[mc.Item]:
  """The dev examples, in file order."""
  path = os.path.join(task_dir, FILE)
  items = []
  for lineno, r in mc.read_jsonl(path, DISPLAY,
                                 fields=('answerKey', 'question')):
    try:
      stem = r['question']['stem']
      choices = sorted((c['label'], c['text'])
                       for c in r['question']['choices'])
    except (KeyError, TypeError):
      raise mc.line_error(path, lineno, DISPLAY, 'expected question.stem and '
                          'question.choices [{label, text}]') from None
    labels = [label for label, _ in choices]
    if r['answerKey'] not in labels:
      raise mc.line_error(path, lineno, DISPLAY, f"answerKey "
                          f"{r['answerKey']!r} is not among the choice "
                          f'labels {labels}')
    items.append(mc.Item(group=GROUP, context=f'Question: {stem}\nAnswer:',
                         # ' ' + text as LibMoE's eval/commonsenseqa.py.
                         options=tuple(' ' + text for _, text in choices),
                         label=labels.index(r['answerKey'])))
  return items
