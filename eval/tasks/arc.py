"""ARC reader: ARC-Easy and ARC-Challenge test sets (algorithms.md §7).

Prompt 'Question: {stem}\nAnswer:', options ' ' + choice, scored by 'norm';
groups 'easy' and 'challenge' (the task score is their mean). LibMoE skips
questions that do not have exactly 4 options. Two layouts are read:

  * AI2's canonical ARC-Easy-Test.jsonl / ARC-Challenge-Test.jsonl
    ({"question": {"stem", "choices": [{"label", "text"}]}, "answerKey"}),
    in the task folder, under ARC-Easy/ (ARC-Challenge/) or under
    ARC-V1-Feb2018-2/ARC-Easy/ as the zip unpacks; used when present, and
    non-4-choice questions are skipped as LibMoE does.
  * Otherwise the converted arc_easy_test.jsonl / arc_challenge_test.jsonl
    ({"query": "Question: <stem>", "choices": [4], "gold"}). Its converter
    padded 3-choice questions to 4 with a duplicated distractor (and cut
    5-choice ones to 4, which cannot be detected), so items whose choices
    repeat are dropped to approximate LibMoE's skip
    (shared/data/README.md §1).
"""

from __future__ import annotations

import os

from eval import multiple_choice as mc

DISPLAY = 'ARC'
NUM_CHOICES = 4
# group -> (converted file, canonical folder name)
SPLITS = {
    'easy': ('arc_easy_test.jsonl', 'ARC-Easy'),
    'challenge': ('arc_challenge_test.jsonl', 'ARC-Challenge'),
}


def canonical_paths(task_dir: str, folder: str) -> list[str]:
  """Where AI2's canonical test file of a split may be, most direct first."""
  name = f'{folder}-Test.jsonl'
  return [os.path.join(task_dir, name),
          os.path.join(task_dir, folder, name),
          os.path.join(task_dir, 'ARC-V1-Feb2018-2', folder, name)]


def load_canonical(path: str, group: str) -> list[mc.Item]:
  """A canonical AI2 file; questions without exactly 4 choices skipped."""
  items = []
  for lineno, r in mc.read_jsonl(path, DISPLAY,
                                 fields=('question', 'answerKey')):
    try:
      stem = r['question']['stem']
      labels = [c['label'] for c in r['question']['choices']]
      texts = [c['text'] for c in r['question']['choices']]
    except (KeyError, TypeError):
      raise mc.line_error(path, lineno, DISPLAY, 'expected question.stem and '
                          'question.choices [{label, text}]') from None
    if len(texts) != NUM_CHOICES:
      continue
    if r['answerKey'] not in labels:
      raise mc.line_error(path, lineno, DISPLAY, f"answerKey "
                          f"{r['answerKey']!r} is not among the choice "
                          f'labels {labels}')
    items.append(mc.Item(group=group, context=f'Question: {stem}\nAnswer:',
                         options=tuple(' ' + t for t in texts),
                         label=labels.index(r['answerKey'])))
  return items


def load_converted(path: str, group: str) -> list[mc.Item]:
  """A converted file; items with repeated (padded) choices dropped."""
  items = []
  for lineno, r in mc.read_jsonl(path, DISPLAY,
                                 fields=('query', 'choices', 'gold')):
    choices, gold = r['choices'], r['gold']
    if not isinstance(choices, list) or not isinstance(gold, int):
      raise mc.line_error(path, lineno, DISPLAY, "expected 'choices' a list "
                          "and 'gold' an integer")
    if len(choices) != NUM_CHOICES or len(set(choices)) != len(choices):
      continue
    if not 0 <= gold < len(choices):
      raise mc.line_error(path, lineno, DISPLAY, f'gold {gold} is out of '
                          f'range for {len(choices)} choices')
    items.append(mc.Item(group=group, context=r['query'] + '\nAnswer:',
                         options=tuple(' ' + c for c in choices), label=gold))
  return items


def load(task_dir: str) -> list[mc.Item]:
  """Easy then Challenge, each from its canonical file when present."""
  items = []
  for group, (converted, folder) in SPLITS.items():
    canonical = [p for p in canonical_paths(task_dir, folder)
                 if os.path.isfile(p)]
    if canonical:
      items.extend(load_canonical(canonical[0], group))
    else:
      items.extend(load_converted(os.path.join(task_dir, converted), group))
  return items
