"""Social IQa reader: siqa/dev.jsonl + siqa/dev-labels.lst (algorithms.md §7).

Prompt 'Context: {context}\nQuestion: {question}\nAnswer:', options
' ' + each of the three answers, the label 1/2/3 from the aligned labels
file. Scored by 'norm'; one group.

The leading ' ' follows LibMoE's code, not algorithms.md §7's table (which
shows no space): LibMoE's language_modeling/framework/dataset/text/eval/
siqa.py encodes `sentence_to_indices(" " + e)` for every answer e.
"""

from __future__ import annotations

import os

from eval import multiple_choice as mc

DISPLAY = 'SIQA'
FILE = 'dev.jsonl'
LABELS = 'dev-labels.lst'
GROUP = 'siqa'
FIELDS = ('context', 'question', 'answerA', 'answerB', 'answerC')


def load(task_dir: str) -> list[mc.Item]:
  """The dev examples, in file order."""
  path = os.path.join(task_dir, FILE)
  labels_path = os.path.join(task_dir, LABELS)
  records = list(mc.read_jsonl(path, DISPLAY, fields=FIELDS))
  labels = mc.read_labels(labels_path, DISPLAY, allowed=('1', '2', '3'))
  mc.aligned(records, labels, path, labels_path, DISPLAY)
  return [mc.Item(
      group=GROUP,
      context=f"Context: {r['context']}\nQuestion: {r['question']}\nAnswer:",
      # ' ' + answer as LibMoE's eval/siqa.py (see the module docstring).
      options=tuple(' ' + r[k] for k in ('answerA', 'answerB', 'answerC')),
      label=int(label) - 1)
          for (_, r), (_, label) in zip(records, labels)]
