"""PIQA reader: piqa/valid.jsonl + piqa/valid-labels.lst (algorithms.md §7).

Prompt 'Question: {goal}\nAnswer:', options ' ' + sol1 / ' ' + sol2, the
label (0/1) from the aligned labels file. Scored by 'norm'; one group.
"""

from __future__ import annotations

import os

from eval import multiple_choice as mc

DISPLAY = 'PIQA'
FILE = 'valid.jsonl'
LABELS = 'valid-labels.lst'
GROUP = 'piqa'


def load(task_dir: str) -> list[mc.Item]:
  """The validation examples, in file order."""
  path = os.path.join(task_dir, FILE)
  labels_path = os.path.join(task_dir, LABELS)
  records = list(mc.read_jsonl(path, DISPLAY, fields=('goal', 'sol1', 'sol2')))
  labels = mc.read_labels(labels_path, DISPLAY, allowed=('0', '1'))
  mc.aligned(records, labels, path, labels_path, DISPLAY)
  return [mc.Item(group=GROUP, context=f"Question: {r['goal']}\nAnswer:",
                  options=(' ' + r['sol1'], ' ' + r['sol2']), label=int(label))
          for (_, r), (_, label) in zip(records, labels)]
