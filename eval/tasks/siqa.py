"""Social IQa reader: siqa/dev.jsonl + siqa/dev-labels.lst (algorithms.md §7).

Prompt 'Context: {context}\nQuestion: {question}\nAnswer:', options the
three answers as they are (LibMoE's table puts no ' ' before them), the
label 1/2/3 from the aligned labels file. Scored by 'norm'; one group.
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
      options=(r['answerA'], r['answerB'], r['answerC']),
      label=int(label) - 1)
          for (_, r), (_, label) in zip(records, labels)]
