"""LAMBADA, LibMoE's way (algorithms.md §7): greedy last-word prediction.

Each passage of OpenAI's lambada_test.jsonl (field `text`) is split at its
last whitespace-delimited word: the context is the text before it (trailing
whitespace removed) and the continuation is ' ' + word. The scorer feeds
the whole passage and takes the model's argmax at each of the word's token
positions (teacher forced); the passage is right iff those tokens,
detokenised and stripped, equal the word exactly. This is not lm-eval's
LAMBADA (which asks whether every token is the argmax): that number is
reported too, as `is_greedy_accuracy`.

Secondary metrics of the entry (LibMoE's LambadaTest.plot in language_
modeling/framework/dataset/text/eval/lambada.py names in brackets):
  * score                 LibMoE's accuracy [accuracy/total];
  * last_token_accuracy   LibMoE's last-token accuracy
                          [accuracy/openai_last_token]: the argmax at the
                          passage's last position equals the last token of
                          ' ' + word encoded on its own;
  * libmoe_perplexity     LibMoE's perplexity [perplexity]: exp of the mean
                          over passages of each passage's MEAN cross-entropy
                          per word token (every passage weighs the same);
  * last_word_ppl         exp of the mean cross-entropy over ALL word tokens
                          of all passages (token-weighted; not LibMoE's);
  * is_greedy_accuracy    lm-eval's acc (every word token is the argmax).

Dimension legend: N passages.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Sequence

from eval import multiple_choice as mc

RULE = 'greedy_last_word'
GROUP = 'lambada'
FILE = 'lambada_test.jsonl'
DISPLAY = 'LAMBADA'


@dataclasses.dataclass(frozen=True)
class LambadaItem:
  context: str   # the passage before its last word, trailing whitespace removed
  word: str      # the last whitespace-delimited word (the target)
  group: str = GROUP  # one group; lets tasks.subsample treat it like an Item

  @property
  def continuation(self) -> str:
    """What is scored after the context: ' ' + word."""
    return ' ' + self.word


def split_last_word(text: str) -> tuple[str, str]:
  """(context, word): the text before its last whitespace-delimited word,
  with the whitespace in between removed, and that word."""
  parts = text.rstrip().rsplit(None, 1)
  if not parts:
    raise ValueError('empty passage: no last word to predict')
  if len(parts) == 1:
    return '', parts[0]
  return parts[0].rstrip(), parts[1]


def load(task_dir: str) -> list[LambadaItem]:
  """The passages of task_dir/lambada_test.jsonl, in file order."""
  path = os.path.join(task_dir, FILE)
  items = []
  for lineno, record in mc.read_jsonl(path, DISPLAY, fields=('text',)):
    text = record['text']
    if not isinstance(text, str) or not text.strip():
      raise mc.line_error(path, lineno, DISPLAY, "field 'text' must be a "
                          'non-empty string')
    context, word = split_last_word(text)
    items.append(LambadaItem(context=context, word=word))
  if not items:
    raise ValueError(f'{DISPLAY}: {path} holds no passages')
  return items


def evaluate(items: Sequence[LambadaItem], scorer: mc.TextScorerProtocol, *,
             desc: str = 'lambada') -> dict[str, Any]:
  """Greedy last-word accuracy of `items` and the task's results entry.

  Every passage goes to the scorer in one loglikelihood call.

  Args:
    items: the N passages.
    scorer: a text scorer (TextScorerProtocol); its decode() detokenises
      the greedy tokens, its encode() gives the last token of ' ' + word.
    desc: shown in the scorer's progress and in errors.

  Returns:
    {'score', 'seq_average' (equal: one group), 'count', 'rule':
    'greedy_last_word', 'groups': {'lambada': {'accuracy', 'count'}},
    'is_greedy_accuracy' (every word token is the argmax),
    'last_token_accuracy' (LibMoE's accuracy/openai_last_token),
    'libmoe_perplexity' (LibMoE's perplexity: exp of the mean over passages
    of minus each passage's mean log-prob per word token),
    'last_word_ppl' (exp of minus the mean log-prob over all word tokens)};
    see the module docstring.
  """
  if not items:
    raise ValueError(f'{desc}: no passages to score')
  pairs = [(item.context, item.continuation) for item in items]
  scores = scorer.loglikelihood(pairs, desc=desc)
  if len(scores) != len(pairs):
    raise ValueError(f'{desc}: the scorer returned {len(scores)} scores for '
                     f'{len(pairs)} passages')
  correct = [scorer.decode(s.greedy_tokens).strip() == item.word
             for item, s in zip(items, scores)]
  entry = mc.summarize(correct, [item.group for item in items], RULE)
  entry['is_greedy_accuracy'] = sum(bool(s.is_greedy) for s in scores) / len(
      scores)
  tokens = sum(s.num_tokens for s in scores)
  if tokens <= 0:
    raise ValueError(f'{desc}: the scorer scored no word tokens')
  logprob = sum(float(s.logprob) for s in scores)
  # exp of a diverged model's loss would overflow; cap it as scoring.py does.
  entry['last_word_ppl'] = math.exp(min(-logprob / tokens, 50.0))
  # LibMoE: n_tok_ok += last_tok == argmax at in_len - 2, where last_tok is
  # sentence_to_indices(" " + word)[-1]; the scorer's last greedy token is
  # the argmax at that position (the passage's last token predicted).
  entry['last_token_accuracy'] = sum(
      bool(s.greedy_tokens) and
      int(s.greedy_tokens[-1]) == _last_token(scorer, item.continuation)
      for item, s in zip(items, scores)) / len(scores)
  # LibMoE: loss_total += F.cross_entropy(word logits, word tokens) (a mean
  # over the word's tokens) per passage; perplexity = exp(loss_total / N).
  if any(s.num_tokens <= 0 for s in scores):
    raise ValueError(f'{desc}: a passage was scored over no word tokens')
  mean_ce = sum(-float(s.logprob) / s.num_tokens for s in scores) / len(scores)
  entry['libmoe_perplexity'] = math.exp(min(mean_ce, 50.0))
  return entry


def _last_token(scorer: mc.TextScorerProtocol, continuation: str) -> int:
  """The last id of `continuation` encoded on its own (LibMoE's last_tok)."""
  encode = getattr(scorer, 'encode', None)
  if encode is None:
    raise TypeError(f'{type(scorer).__name__}: LAMBADA needs the scorer\'s '
                    'encode() (TextScorerProtocol) for the last-token '
                    'accuracy')
  ids = list(encode(continuation))
  if not ids:
    raise ValueError(f'continuation {continuation!r} encodes to no tokens')
  return int(ids[-1])
