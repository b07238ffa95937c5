"""LibMoE's multiple-choice rules (algorithms.md §7) on hand-set scores."""

import subprocess
import sys

import pytest

from eval import multiple_choice as mc
from tests.eval.conftest import REPO_ROOT, StubScore, StubScorer


def score(logprob, num_tokens, context_logprob=0.0):
  return StubScore(logprob=logprob, num_tokens=num_tokens, is_greedy=False,
                   greedy_tokens=(), context_logprob=context_logprob)


def test_rules_are_the_spec():
  assert mc.RULES == ('sum', 'norm')


def test_sum_is_the_whole_sequence():
  # context_logprob + logprob: -10 + -2 = -12 and -1 + -4 = -5.
  scores = mc.option_scores([score(-2.0, 1, -10.0), score(-4.0, 2, -1.0)],
                            'sum')
  assert scores == [-12.0, -5.0]


def test_norm_divides_by_option_tokens_and_ignores_the_context():
  # -6 / 3 = -2 and -4 / 1 = -4; the context's log-probs play no part.
  scores = mc.option_scores([score(-6.0, 3, -100.0), score(-4.0, 1, 0.0)],
                            'norm')
  assert scores == [-2.0, -4.0]


def test_norm_needs_option_tokens():
  with pytest.raises(ValueError, match='0 tokens'):
    mc.option_scores([score(0.0, 0), score(-1.0, 1)], 'norm')


def test_unknown_rule():
  with pytest.raises(ValueError, match="'mean'.*'sum', 'norm'"):
    mc.option_scores([score(-1.0, 1)], 'mean')


@pytest.mark.parametrize('scores, label, expected', [
    ([-1.0, -2.0, -3.0], 0, True),
    ([-2.0, -1.0, -3.0], 1, True),
    ([-2.0, -1.0, -3.0], 0, False),
    ([-1.0, -1.0, -3.0], 0, False),    # a tie with a distractor is wrong
    ([-3.0, -1.0, -1.0], 2, False),    # also when the tie is the maximum
    ([-3.0, -2.0, -1.0], 2, True),
])
def test_is_correct_is_strict(scores, label, expected):
  assert mc.is_correct(scores, label) is expected


def test_evaluate_items_one_call_group_average():
  items = [
      mc.Item('a', 'Q1', (' x', ' y'), 0),
      mc.Item('b', 'Q2', (' x', ' y', ' z'), 2),
      mc.Item('a', 'Q3', (' x', ' y'), 1),
  ]
  scorer = StubScorer({
      # Item 1 (a): sum -1-2 = -3 > -1-5 = -6: right.
      ('Q1', ' x'): (-2.0, 1, -1.0, ''),
      ('Q1', ' y'): (-5.0, 1, -1.0, ''),
      # Item 2 (b): z: -3-1 = -4 beats -7 and -9: right.
      ('Q2', ' x'): (-6.0, 2, -3.0, ''),
      ('Q2', ' y'): (-4.0, 1, -3.0, ''),
      ('Q2', ' z'): (-1.0, 1, -3.0, ''),
      # Item 3 (a): y ties x at -4: wrong.
      ('Q3', ' x'): (-2.0, 1, -2.0, ''),
      ('Q3', ' y'): (-2.0, 3, -2.0, ''),
  })
  entry = mc.evaluate_items(items, scorer, 'sum', desc='toy')
  # Group a: 1 of 2 = 0.5; group b: 1 of 1 = 1.0.
  # score = (0.5 + 1.0) / 2 = 0.75; seq_average = 2 / 3.
  assert entry == {
      'score': 0.75, 'seq_average': pytest.approx(2 / 3), 'count': 3,
      'rule': 'sum',
      'groups': {'a': {'accuracy': 0.5, 'count': 2},
                 'b': {'accuracy': 1.0, 'count': 1}},
  }
  # One call, every option of every item, in item order.
  assert len(scorer.calls) == 1
  pairs, desc = scorer.calls[0]
  assert desc == 'toy'
  assert pairs == [('Q1', ' x'), ('Q1', ' y'), ('Q2', ' x'), ('Q2', ' y'),
                   ('Q2', ' z'), ('Q3', ' x'), ('Q3', ' y')]


def test_norm_flips_the_sum_answer():
  items = [mc.Item('g', 'Q', (' long answer', ' no'), 0)]
  scorer = StubScorer({
      ('Q', ' long answer'): (-6.0, 3, -1.0, ''),   # sum -7, norm -2
      ('Q', ' no'): (-4.0, 1, -1.0, ''),            # sum -5, norm -4
  })
  # Sum prefers ' no' (-5 > -7): wrong. Norm prefers the label (-2 > -4).
  assert mc.evaluate_items(items, scorer, 'sum', desc='t')['score'] == 0.0
  assert mc.evaluate_items(items, scorer, 'norm', desc='t')['score'] == 1.0


def test_evaluate_items_checks_the_scorer_answer():
  class Short(StubScorer):
    def loglikelihood(self, pairs, *, desc=''):
      return super().loglikelihood(pairs, desc=desc)[:-1]
  scorer = Short({('Q', 'a'): (-1.0, 1, 0.0, ''),
                  ('Q', 'b'): (-2.0, 1, 0.0, '')})
  with pytest.raises(ValueError, match='1 scores for 2'):
    mc.evaluate_items([mc.Item('g', 'Q', ('a', 'b'), 0)], scorer, 'norm',
                      desc='t')


def test_evaluate_items_rejects_bad_items():
  scorer = StubScorer({})
  with pytest.raises(ValueError, match='no items'):
    mc.evaluate_items([], scorer, 'norm', desc='t')
  with pytest.raises(ValueError, match='label 2; expected 0..1'):
    mc.evaluate_items([mc.Item('g', 'Q', ('a', 'b'), 2)], scorer, 'norm',
                      desc='t')
  with pytest.raises(ValueError, match='unknown multiple-choice rule'):
    mc.evaluate_items([mc.Item('g', 'Q', ('a', 'b'), 0)], scorer, 'acc',
                      desc='t')
  assert not scorer.calls


def test_stub_scorer_raises_on_an_unknown_pair():
  with pytest.raises(KeyError, match='no value set'):
    StubScorer({}).loglikelihood([('ctx', ' cont')])


def test_the_eval_readers_do_not_import_jax():
  code = ('import sys; import eval.tasks, eval.lambada, eval.multiple_choice; '
          "assert 'jax' not in sys.modules, 'jax was imported'")
  subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, check=True)
