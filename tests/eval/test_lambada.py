"""LAMBADA, LibMoE's way: greedy last-word exact match (eval/lambada.py)."""

import json
import math
import re

import pytest

from eval import lambada
from eval import tasks
from tests.eval.conftest import StubScorer


def write_passages(task_dir, texts):
  task_dir.mkdir(parents=True, exist_ok=True)
  with open(task_dir / 'lambada_test.jsonl', 'w') as f:
    for text in texts:
      f.write(json.dumps({'text': text}) + '\n')


@pytest.mark.parametrize('text, context, word', [
    ('The dog barked at the\n\nmailman', 'The dog barked at the', 'mailman'),
    ('He waved at Tom. \n', 'He waved at', 'Tom.'),
    ('alone', '', 'alone'),
    ('a  "quoted"  end', 'a  "quoted"', 'end'),
])
def test_split_last_word(text, context, word):
  assert lambada.split_last_word(text) == (context, word)


def test_split_last_word_of_nothing():
  with pytest.raises(ValueError, match='no last word'):
    lambada.split_last_word(' \n')


def test_lambada_golden(tmp_path):
  write_passages(tmp_path / 'lambada', [
      'The dog barked at the\n\nmailman',
      'She opened the door and saw her brother',
      'He waved at Tom. ',
  ])
  table = {
      # (logprob, num_tokens, context_logprob, greedy_text)
      # Greedy tokens decode to ' mailman' -> 'mailman': right, is_greedy.
      ('The dog barked at the', ' mailman'): (-2.0, 2, -30.0, ' mailman'),
      # ' Brother' != 'brother' (exact, case-sensitive match): wrong.
      ('She opened the door and saw her', ' brother'):
          (-6.0, 1, -30.0, ' Brother'),
      # Other tokens than the reference's (no leading space) that decode to
      # the same word: right, though not is_greedy.
      ('He waved at', ' Tom.'): (-4.0, 3, -30.0, 'Tom.'),
  }
  scorer = StubScorer(table)
  entry = tasks.run_task('lambada', scorer, str(tmp_path))
  assert len(scorer.calls) == 1 and scorer.calls[0][1] == 'lambada'
  # Right: passages 1 and 3 -> 2/3. is_greedy: passage 1 only -> 1/3.
  # Last-word perplexity: exp(-(-2 - 6 - 4) / (2 + 1 + 3)) = exp(12 / 6)
  # = exp(2).
  assert entry == {
      'score': pytest.approx(2 / 3), 'seq_average': pytest.approx(2 / 3),
      'count': 3, 'rule': 'greedy_last_word',
      'groups': {'lambada': {'accuracy': pytest.approx(2 / 3), 'count': 3}},
      'is_greedy_accuracy': pytest.approx(1 / 3),
      'last_word_ppl': pytest.approx(math.exp(2.0)),
      # The last greedy character equals the continuation's last one in
      # all three ('n', 'r', '.'; the stub's tokens are characters), even
      # for ' Brother': LibMoE's last-token accuracy is 3/3.
      'last_token_accuracy': 1.0,
      # LibMoE's perplexity: per-passage mean CE 2/2 = 1, 6/1 = 6, 4/3;
      # exp((1 + 6 + 4/3) / 3) = exp(25/9).
      'libmoe_perplexity': pytest.approx(math.exp(25 / 9)),
  }
  # max_examples=2 of 3: positions floor(0 * 3/2) = 0 and floor(3/2) = 1;
  # passage 1 right, passage 2 wrong -> 1/2.
  entry = tasks.run_task('lambada', StubScorer(table), str(tmp_path),
                         max_examples=2)
  assert entry['count'] == 2 and entry['score'] == 0.5


def test_lambada_libmoe_secondary_metrics():
  """LibMoE's accuracy/openai_last_token and perplexity (LambadaTest.plot in
  LibMoE's eval/lambada.py) on hand-set scores."""
  items = [lambada.LambadaItem('x', 'a'), lambada.LambadaItem('y', 'bcd'),
           lambada.LambadaItem('z', 'ef')]
  table = {
      # 1 word token at log-prob -1; greedy ' a': word right, last token
      # 'a' right.
      ('x', ' a'): (-1.0, 1, 0.0, ' a'),
      # 3 word tokens at -9 in all; greedy ' bcx': word wrong, last token
      # 'x' != 'd' wrong.
      ('y', ' bcd'): (-9.0, 3, 0.0, ' bcx'),
      # 2 tokens at -4; greedy ' qf': word wrong, last token 'f' right.
      ('z', ' ef'): (-4.0, 2, 0.0, ' qf'),
  }
  entry = lambada.evaluate(items, StubScorer(table))
  assert entry['score'] == pytest.approx(1 / 3)
  assert entry['last_token_accuracy'] == pytest.approx(2 / 3)
  # LibMoE: exp(mean over passages of the mean CE per word token)
  # = exp((1/1 + 9/3 + 4/2) / 3) = exp(2).
  assert entry['libmoe_perplexity'] == pytest.approx(math.exp(2.0))
  # Token-weighted: exp((1 + 9 + 4) / (1 + 3 + 2)) = exp(14/6).
  assert entry['last_word_ppl'] == pytest.approx(math.exp(14 / 6))
  # The brief's two passages: 1 token at -1 and 3 tokens at -9:
  # exp((1 + 3) / 2) = 7.389.
  entry = lambada.evaluate(items[:2], StubScorer(table))
  assert entry['libmoe_perplexity'] == pytest.approx(7.389056, rel=1e-6)
  assert entry['last_word_ppl'] == pytest.approx(math.exp(10 / 4))


def test_lambada_malformed_line(tmp_path):
  d = tmp_path / 'lambada'
  d.mkdir()
  path = d / 'lambada_test.jsonl'
  path.write_text('{"text": "a b"}\n{"txt": "c d"}\n')
  with pytest.raises(ValueError,
                     match=re.escape(f'{path} line 2: missing field')):
    lambada.load(str(d))
  path.write_text('{"text": "a b"}\n{"text": "   "}\n')
  with pytest.raises(ValueError,
                     match=re.escape(f"{path} line 2: field 'text'")):
    lambada.load(str(d))


def test_lambada_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    lambada.load(str(tmp_path / 'lambada'))
  assert str(tmp_path / 'lambada' / 'lambada_test.jsonl') in str(e.value)
  assert 'config.eval.data_dir' in str(e.value)


def test_real_lambada(lm_eval_data):
  d = lm_eval_data / 'lambada'
  if not d.is_dir():
    pytest.skip(f'LAMBADA data not found at {d}')
  items = lambada.load(str(d))
  assert len(items) == 5153
  assert items[0].word == 'signs'
  assert items[0].context.endswith("I don't care about")
  assert all(i.word and not any(c.isspace() for c in i.word) for i in items)
  assert all(i.context == i.context.rstrip() for i in items)
  assert items[0].continuation == ' signs'
