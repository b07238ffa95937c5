"""HellaSwag reader: the original hellaswag_val.jsonl (algorithms.md §7).

The prompt and endings are lm-eval's: context = preprocess(activity_label +
': ' + ctx_a + ' ' + ctx_b.capitalize()), options ' ' + preprocess(ending).
Scored by 'norm' (per option token); one group.
"""

from __future__ import annotations

import os
import re

from eval import multiple_choice as mc

DISPLAY = 'HellaSwag'
FILE = 'hellaswag_val.jsonl'
GROUP = 'hellaswag'
FIELDS = ('activity_label', 'ctx_a', 'ctx_b', 'endings', 'label')


def preprocess(text: str) -> str:
  """lm-eval's HellaSwag clean-up of WikiHow markup."""
  text = text.strip()
  # WikiHow step titles end a sentence; other [tags] are dropped.
  text = text.replace(' [title]', '. ')
  text = re.sub('\\[.*?\\]', '', text)
  text = text.replace('  ', ' ')
  return text


def load(task_dir: str) -> list[mc.Item]:
  """The validation examples of task_dir/hellaswag_val.jsonl."""
  path = os.path.join(task_dir, FILE)
  items = []
  for lineno, r in mc.read_jsonl(path, DISPLAY, fields=FIELDS):
    endings = r['endings']
    try:
      label = int(r['label'])
    except (TypeError, ValueError):
      raise mc.line_error(path, lineno, DISPLAY, f"label {r['label']!r} is "
                          'not an integer') from None
    if not isinstance(endings, list) or not 0 <= label < len(endings):
      raise mc.line_error(path, lineno, DISPLAY, 'expected a list of endings '
                          'and a label indexing it')
    ctx = r['ctx_a'] + ' ' + r['ctx_b'].capitalize()
    items.append(mc.Item(
        group=GROUP, context=preprocess(r['activity_label'] + ': ' + ctx),
        options=tuple(' ' + preprocess(e) for e in endings), label=label))
  return items
