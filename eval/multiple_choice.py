"""Multiple-choice items and LibMoE's scoring rules (algorithms.md §7).

Every zero-shot task except LAMBADA is a list of `Item`s: a prompt, its
options (the continuations to score) and the index of the right one. Each
option is scored as a (context, continuation) pair by a text scorer
(eval/text_scorer.py, or a hand-built stub in the tests), and the item is
right iff the label's score is strictly greater than every other option's:

  * 'sum':  context_logprob + logprob, the log-probability of the whole
            sequence (BLiMP, whose context is empty, and CBT, whose context
            is shared by the options, so it ranks them as logprob does);
  * 'norm': logprob / num_tokens, the option's mean log-probability per
            TOKEN (not per character as in lm-eval's acc_norm).

Caveat of 'sum' with long contexts: the scorer left-truncates each
(context, option) row to max_len + 1 tokens on its own, so when a context
plus an option is longer than that (CBT's 20-sentence contexts with a short
max_len; BLiMP only with a tiny one), a longer option loses more context
tokens, its context_logprob sums fewer (negative) terms and 'sum' is biased
towards it. The options of an item are then not compared over the same
context (eval/lm_eval_compare.py EXPLANATION, 3).

A task's score is the unweighted mean of its group accuracies (LibMoE's
group_average); the mean over all items is kept as `seq_average`.

The task readers (eval/tasks/) also share this module's file helpers, so
that a missing file or a malformed line reads the same in every task.

Dimension legend: N items, O options of an item.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Protocol, Sequence

RULES = ('sum', 'norm')

# Where the readers' files come from; named in every missing-file error.
DATA_DIR_FIELD = 'config.eval.data_dir'


@dataclasses.dataclass(frozen=True)
class Item:
  """One question: a prompt, its options and the right option's index."""
  group: str                 # e.g. 'easy'/'challenge' (ARC), 'high'/'middle' (RACE), BLiMP paradigm
  context: str               # prompt ('' for BLiMP)
  options: tuple[str, ...]   # continuation strings, with the leading ' ' where the prompt has it
  label: int                 # index of the correct option


class Score(Protocol):
  """The fields of moe_jax.loglikelihood.Score that the tasks read.

  A protocol rather than an import, so that reading and scoring the tasks
  needs neither JAX nor a model (the tests use hand-built scores).
  """
  logprob: float                  # sum of log p over the continuation tokens
  num_tokens: int                 # number of continuation tokens scored
  is_greedy: bool                 # every continuation token is the argmax
  greedy_tokens: tuple[int, ...]  # argmax token at each continuation position
  context_logprob: float          # sum of log p over the predicted context


class TextScorerProtocol(Protocol):
  """What the tasks need from a scorer (eval/text_scorer.py TextScorer)."""

  def loglikelihood(self, pairs: Sequence[tuple[str, str]], *,
                    desc: str = '') -> list[Score]:
    ...

  def decode(self, tokens: Sequence[int]) -> str:
    ...

  def encode(self, text: str) -> list[int]:
    ...


def check_rule(rule: str) -> str:
  """`rule` if it is one of RULES, else a ValueError listing them."""
  if rule not in RULES:
    raise ValueError(f'unknown multiple-choice rule {rule!r}; expected one '
                     f'of {RULES}')
  return rule


def option_scores(item_scores: Sequence[Score], rule: str) -> list[float]:
  """One item's option scores [O] under `rule` ('sum' or 'norm').

  Args:
    item_scores: the scorer's Score of each option, in option order.
    rule: 'sum' (context_logprob + logprob) or 'norm' (logprob /
      num_tokens).

  Returns:
    The O scores as Python floats; higher is better.
  """
  check_rule(rule)
  if rule == 'sum':
    return [float(s.context_logprob) + float(s.logprob) for s in item_scores]
  scores = []
  for i, s in enumerate(item_scores):
    if s.num_tokens <= 0:
      # An empty continuation has no per-token mean; it would divide by 0.
      raise ValueError(f'option {i} was scored over {s.num_tokens} tokens; '
                       "the 'norm' rule needs at least one option token")
    scores.append(float(s.logprob) / s.num_tokens)
  return scores


def is_correct(scores: Sequence[float], label: int) -> bool:
  """True iff scores[label] is strictly greater than every other score.

  A tie with any distractor counts as wrong (algorithms.md §7 rule 3).
  """
  return all(scores[label] > s for i, s in enumerate(scores) if i != label)


def check_items(items: Sequence[Item], desc: str) -> None:
  """Raises a ValueError for an empty list or an item that cannot be
  scored (fewer than 2 options, label out of range)."""
  if not items:
    raise ValueError(f'{desc}: no items to score')
  for n, item in enumerate(items):
    if len(item.options) < 2:
      raise ValueError(f'{desc}: item {n} (group {item.group!r}) has '
                       f'{len(item.options)} option(s); expected at least 2')
    if not 0 <= item.label < len(item.options):
      raise ValueError(f'{desc}: item {n} (group {item.group!r}) has label '
                       f'{item.label}; expected 0..{len(item.options) - 1}')


def summarize(correct: Sequence[bool], groups: Sequence[str], rule: str
              ) -> dict[str, Any]:
  """The results-file entry of a task from per-item outcomes [N].

  Args:
    correct: whether each item was answered right.
    groups: each item's group, aligned with `correct`.
    rule: the scoring rule's name, recorded in the entry.

  Returns:
    {'score' (mean of the group accuracies), 'seq_average' (mean over
    items), 'count', 'rule', 'groups': {group: {'accuracy', 'count'}}},
    groups in order of first appearance.
  """
  hits: dict[str, list[int]] = {}
  for ok, group in zip(correct, groups, strict=True):
    hits.setdefault(group, []).append(int(ok))
  per_group = {g: {'accuracy': sum(h) / len(h), 'count': len(h)}
               for g, h in hits.items()}
  return {
      'score': sum(g['accuracy'] for g in per_group.values()) / len(per_group),
      'seq_average': sum(map(int, correct)) / len(correct),
      'count': len(correct),
      'rule': rule,
      'groups': per_group,
  }


def evaluate_items(items: Sequence[Item], scorer: TextScorerProtocol,
                   rule: str, *, desc: str) -> dict[str, Any]:
  """Scores every option of every item and returns the task's entry.

  All (context, option) pairs go to the scorer in ONE loglikelihood call,
  so that the scorer can sort and batch the whole task by length.

  Args:
    items: the task's N items.
    scorer: a text scorer (TextScorerProtocol).
    rule: 'sum' or 'norm'.
    desc: the task's name, shown in the scorer's progress and in errors.

  Returns:
    The task entry of the results file (see `summarize`).
  """
  check_rule(rule)
  check_items(items, desc)
  pairs = [(item.context, option) for item in items for option in item.options]
  scores = scorer.loglikelihood(pairs, desc=desc)
  if len(scores) != len(pairs):
    raise ValueError(f'{desc}: the scorer returned {len(scores)} scores for '
                     f'{len(pairs)} (context, continuation) pairs')
  correct = []
  start = 0
  for item in items:
    stop = start + len(item.options)
    correct.append(is_correct(option_scores(scores[start:stop], rule),
                              item.label))
    start = stop
  return summarize(correct, [item.group for item in items], rule)


# File helpers shared by the task readers.


def missing_file(path: str, task: str) -> FileNotFoundError:
  """The error for a task file that is not where it was looked for."""
  return FileNotFoundError(
      f'{task}: data file {path} not found. Zero-shot task files are read '
      f'from {DATA_DIR_FIELD}, one folder per task (e.g. '
      '<data_dir>/piqa/valid.jsonl); set it to the folder that holds the '
      'task folders')


def require_file(path: str, task: str) -> str:
  """`path` if it is a file, else the missing-file error."""
  if not os.path.isfile(path):
    raise missing_file(path, task)
  return path


def line_error(path: str, lineno: int, task: str, what: str) -> ValueError:
  """The error for a malformed line: names the file and line (1-based)."""
  return ValueError(f'{task}: {path} line {lineno}: {what}')


def read_jsonl(path: str, task: str, fields: Sequence[str] = ()
               ) -> Iterator[tuple[int, dict[str, Any]]]:
  """(line number, object) for each non-blank line of a JSON-lines file.

  Args:
    path: the file; a FileNotFoundError naming it and DATA_DIR_FIELD when
      absent.
    task: the task's display name, for errors.
    fields: keys every object must have.

  Raises:
    ValueError naming the file and line for a line that is not a JSON
    object or lacks one of `fields`.
  """
  require_file(path, task)
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise line_error(path, lineno, task, f'not valid JSON ({e})') from e
      if not isinstance(record, dict):
        raise line_error(path, lineno, task, 'expected a JSON object, got '
                         f'{type(record).__name__}')
      missing = [k for k in fields if k not in record]
      if missing:
        raise line_error(path, lineno, task, f'missing field(s) {missing}; '
                         f'expected {list(fields)}')
      yield lineno, record


def read_labels(path: str, task: str, allowed: Sequence[str]
                ) -> list[tuple[int, str]]:
  """(line number, label) for each non-blank line of a labels file.

  Raises:
    ValueError naming the file and line for a label not in `allowed`.
  """
  require_file(path, task)
  labels = []
  with open(path, encoding='utf-8') as f:
    for lineno, line in enumerate(f, start=1):
      value = line.strip()
      if not value:
        continue
      if value not in allowed:
        raise line_error(path, lineno, task, f'label {value!r}; expected one '
                         f'of {list(allowed)}')
      labels.append((lineno, value))
  return labels


def aligned(records: list, labels: list, records_path: str,
            labels_path: str, task: str) -> None:
  """Raises a ValueError when a data file and its labels file differ in
  length (they are aligned line by line)."""
  if len(records) != len(labels):
    raise ValueError(f'{task}: {records_path} has {len(records)} examples but '
                     f'{labels_path} has {len(labels)} labels; the two files '
                     'are aligned line by line')
