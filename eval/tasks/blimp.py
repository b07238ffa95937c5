"""BLiMP reader: 67 paradigm files blimp/<paradigm>.jsonl (algorithms.md §7).

Each line is a minimal pair. The item has no context and two options,
(sentence_good, sentence_bad), with label 0: the model is right iff it
gives the grammatical sentence the higher total log-probability ('sum').
One group per paradigm (the file stem); the task score is their mean.
"""

from __future__ import annotations

import glob
import os

from eval import multiple_choice as mc

DISPLAY = 'BLiMP'
PATTERN = '*.jsonl'


def load(task_dir: str) -> list[mc.Item]:
  """The minimal pairs of every task_dir/*.jsonl, files in sorted order."""
  pattern = os.path.join(task_dir, PATTERN)
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise mc.missing_file(pattern, DISPLAY)
  items = []
  for path in paths:
    paradigm = os.path.splitext(os.path.basename(path))[0]
    for lineno, record in mc.read_jsonl(
        path, DISPLAY, fields=('sentence_good', 'sentence_bad')):
      good, bad = record['sentence_good'], record['sentence_bad']
      if not (isinstance(good, str) and isinstance(bad, str)):
        raise mc.line_error(path, lineno, DISPLAY, 'sentence_good and '
                            'sentence_bad must be strings')
      items.append(mc.Item(group=paradigm, context='', options=(good, bad),
                           label=0))
  return items
