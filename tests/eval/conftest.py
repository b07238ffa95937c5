"""Fixtures of the zero-shot task tests: a hand-set scorer and the real data.

`StubScorer` stands in for eval/text_scorer.py's TextScorer. Its
log-likelihoods are set by hand per (context, continuation) pair, and it
raises on any other pair, so a test that feeds it also pins the exact
prompt strings a task builds. Greedy tokens are the character codes of a
hand-set text, and decode() maps them back.

Nothing here imports JAX: these tests read files and add numbers.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Callable, Mapping, Sequence

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
# The real task files live next to the repository (../shared/data/lm_eval).
LM_EVAL_DATA = (REPO_ROOT / '..' / 'shared' / 'data' / 'lm_eval').resolve()

# (logprob, num_tokens, context_logprob, greedy_text)
Entry = tuple[float, int, float, str]


@dataclasses.dataclass(frozen=True)
class StubScore:
  """The fields of moe_jax.loglikelihood.Score, without importing it."""
  logprob: float
  num_tokens: int
  is_greedy: bool
  greedy_tokens: tuple[int, ...]
  context_logprob: float


class UnknownPair(KeyError):
  """A (context, continuation) pair the test did not set a value for."""


class StubScorer:
  """A text scorer whose log-likelihoods are set by hand.

  Args:
    table: {(context, continuation): (logprob, num_tokens, context_logprob,
      greedy_text)}. greedy_text is what the model's argmax tokens decode
      to; the score is greedy (is_greedy) iff it equals the continuation.
    fallback: optional (context, continuation) -> Entry for pairs not in
      the table (smoke tests over real data); without it an unknown pair
      raises UnknownPair.

  Every call is recorded in `calls` as (pairs, desc).
  """

  def __init__(self, table: Mapping[tuple[str, str], Entry],
               fallback: Callable[[str, str], Entry] | None = None):
    self.table = dict(table)
    self.fallback = fallback
    self.calls: list[tuple[list[tuple[str, str]], str]] = []

  def loglikelihood(self, pairs: Sequence[tuple[str, str]], *,
                    desc: str = '') -> list[StubScore]:
    pairs = list(pairs)
    self.calls.append((pairs, desc))
    return [self._score(context, continuation)
            for context, continuation in pairs]

  def _score(self, context: str, continuation: str) -> StubScore:
    if (context, continuation) in self.table:
      entry = self.table[(context, continuation)]
    elif self.fallback is not None:
      entry = self.fallback(context, continuation)
    else:
      raise UnknownPair(f'no value set for context={context!r}, '
                        f'continuation={continuation!r}')
    logprob, num_tokens, context_logprob, greedy_text = entry
    return StubScore(logprob=logprob, num_tokens=num_tokens,
                     is_greedy=greedy_text == continuation,
                     greedy_tokens=tuple(ord(c) for c in greedy_text),
                     context_logprob=context_logprob)

  def decode(self, tokens: Sequence[int]) -> str:
    return ''.join(chr(t) for t in tokens)

  def encode(self, text: str) -> list[int]:
    """Character codes, the inverse of decode."""
    return [ord(c) for c in text]


@pytest.fixture(scope='session')
def lm_eval_data() -> pathlib.Path:
  """../shared/data/lm_eval; skips the test when it is absent."""
  if not LM_EVAL_DATA.is_dir():
    pytest.skip(f'real task data not found at {LM_EVAL_DATA} (expected '
                '../shared/data/lm_eval next to the repository)')
  return LM_EVAL_DATA
