"""Golden values of the trace metrics on a 4-token hand-built trace.

Trace (E' = 4, K = 2): sequence 0 (domain 0): tokens {0: .75, 1: .25} and
{0: .5, 2: .5}; sequence 1 (domain 1): {3: .6, 1: .4} and {1: 1.0} with an
inactive second slot (choice -1, weight 0: the RouterOutput contract).
Selections per expert: [2, 3, 1, 1].
"""

import math

import numpy as np
import pandas as pd
import pytest

from moe_jax.analysis import metrics

WIDTH = 4


def trace(first_token=(0, 1)):
  rows = [
      (0, 0, 0, first_token, (0.75, 0.25)),
      (0, 1, 0, (0, 2), (0.5, 0.5)),
      (1, 0, 1, (3, 1), (0.6, 0.4)),
      (1, 1, 1, (1, -1), (1.0, 0.0)),
  ]
  return pd.DataFrame([
      {'sequence': s, 'position': p, 'domain': d, 'choice_0': c[0],
       'choice_1': c[1], 'weight_0': w[0], 'weight_1': w[1],
       **{f'prob_{e}': 0.25 for e in range(WIDTH)}}
      for s, p, d, c, w in rows])


def h(*p):
  return -sum(x * math.log(x) for x in p if x > 0)


def test_selection_frequency_and_co_activation():
  np.testing.assert_allclose(metrics.selection_frequency(trace(), WIDTH),
                             [2 / 7, 3 / 7, 1 / 7, 1 / 7])
  expected = np.array([[2, 1, 1, 0],
                       [1, 3, 0, 1],
                       [1, 0, 1, 0],
                       [0, 1, 0, 1]])
  np.testing.assert_array_equal(metrics.co_activation(trace(), WIDTH),
                                expected)


def test_entropies_and_margin():
  # Top-1 (choice_0: the uniform prob_ columns are left out here, see
  # test_top1_is_the_argmax_of_the_distribution) histograms: sequence 0
  # [2, 0, 0, 0] -> 0; sequence 1 [0, 1, 0, 1] -> ln 2 / ln 4 = 0.5.
  no_probs = trace().drop(columns=[f'prob_{e}' for e in range(WIDTH)])
  assert metrics.allocation_entropy(no_probs, WIDTH) == pytest.approx(0.25)
  expected = (h(.75, .25) + h(.5, .5) + h(.6, .4) + h(1.0)) / 4
  assert metrics.weight_entropy(trace()) == pytest.approx(expected)
  assert metrics.router_margin(trace()) == pytest.approx(
      (0.5 + 0.0 + 0.2 + 1.0) / 4)
  assert metrics.h_total(trace()) == pytest.approx(math.log(4))
  with pytest.raises(ValueError, match='trace_probs'):
    metrics.h_total(trace().drop(columns=[f'prob_{e}' for e in range(4)]))


def test_change_rate_and_saturation():
  # Token 0 moves its second choice from expert 1 to 2: 6 of 7 pairs stay.
  before, after = trace(), trace(first_token=(0, 2))
  assert metrics.change_rate(before, after, WIDTH) == pytest.approx(
      100 - 100 * 6 / 7)
  assert metrics.saturation(before, after, WIDTH) == pytest.approx(
      100 * 6 / 7)
  assert metrics.change_rate(before, before, WIDTH) == 0.0
  shuffled = before.iloc[::-1]
  assert metrics.saturation(shuffled, before, WIDTH) == 100.0
  with pytest.raises(ValueError, match='different tokens'):
    metrics.change_rate(before, before.iloc[:3], WIDTH)


def test_load_balance():
  counts = np.array([2.0, 3.0, 1.0, 1.0])
  mean = 7 / 4
  std = math.sqrt(sum((c - mean) ** 2 for c in counts) / 4)
  stats = metrics.load_balance(trace(), WIDTH)
  assert stats['dead_proportion'] == 0.0
  assert stats['jain_fairness'] == pytest.approx(49 / (4 * 15))
  assert stats['load_cv'] == pytest.approx(std / mean)
  assert stats['max_mean_load'] == pytest.approx(3 / mean)
  assert stats['usage_relative_perplexity'] == pytest.approx(
      math.exp(h(2 / 7, 3 / 7, 1 / 7, 1 / 7)) / 4)


def test_per_domain_entropy():
  by_domain = metrics.per_domain_entropy(trace(), WIDTH)
  # Domain 0 selects [2, 1, 1, 0]; domain 1 selects [0, 2, 0, 1].
  assert by_domain[0] == pytest.approx(h(.5, .25, .25) / math.log(4))
  assert by_domain[1] == pytest.approx(h(2 / 3, 1 / 3) / math.log(4))


def test_layer_overlap_universal_and_optimist_scores():
  u = np.array([[.5, .5, 0.], [.25, .25, .5], [0., 0., 1.]])
  overlap = metrics.layer_overlap(u)
  # O_01 = .25 + .25 = .5; O_02 = 0; O_12 = .5; diagonal 1.
  np.testing.assert_allclose(overlap, [[1., .5, 0.], [.5, 1., .5],
                                       [0., .5, 1.]])
  assert metrics.universal_score(overlap) == pytest.approx(1 / 3)
  assert metrics.optimist_score(overlap) == pytest.approx(0.5)


def test_token_jaccard_and_layer_selection_overlap():
  other = trace()
  other['choice_0'] = [0, 3, 3, 1]
  other['choice_1'] = [2, 2, 1, -1]
  # Token sets, trace vs other: {0,1}|{0,2}: 1/3; {0,2}|{3,2}: 1/3;
  # {3,1}|{3,1}: 1; {1} (second slot inactive)|{1}: 1.
  assert metrics.token_jaccard(trace(), other) == pytest.approx(
      (1 / 3 + 1 / 3 + 1 + 1) / 4)
  # Intersections 1, 1, 2, 1 over k = 2.
  assert metrics.layer_sel_overlap(other, trace()) == pytest.approx(
      (1 + 1 + 2 + 1) / 8)
  with pytest.raises(ValueError, match='different tokens'):
    metrics.token_jaccard(trace(), other.iloc[:3])


def test_selection_is_choice_not_weight():
  # MoE++ zero experts and TC-MoE null slots are selections with weight 0
  # (their trace weight is 0); only choice -1 is no selection.
  frame = trace()
  frame.loc[1, 'weight_1'] = 0.0           # token 1's expert 2, weight 0
  np.testing.assert_allclose(metrics.selection_frequency(frame, WIDTH),
                             [2 / 7, 3 / 7, 1 / 7, 1 / 7])
  assert metrics.load_balance(frame, WIDTH)['dead_proportion'] == 0.0
  with pytest.raises(ValueError, match="router width E' = 3"):
    metrics.indicator(frame, 3)


def test_top1_is_the_argmax_of_the_distribution():
  # A biased selection (DeepSeek-V3) can rank choice_0 below another id:
  # §9's top-1 is the argmax of gate_softmax.
  frame = trace().drop(columns=[f'prob_{e}' for e in range(WIDTH)])
  assert metrics.allocation_entropy(frame, WIDTH) == pytest.approx(0.25)
  # Sequence 0's top-1 by the distribution: experts 0 and 3 -> ln 2 / ln 4;
  # sequence 1: 1 and 1 -> 0.
  probs = np.array([[.4, .1, .1, .4001], [.7, .1, .1, .1],
                    [.1, .6, .2, .1], [.1, .7, .1, .1]])
  with_probs = frame.assign(**{f'prob_{e}': probs[:, e] for e in range(4)})
  assert metrics.allocation_entropy(with_probs, WIDTH) == pytest.approx(0.25)
  np.testing.assert_array_equal(metrics.top1(with_probs), [3, 0, 1, 1])
  # The trace's own top1 column wins over both.
  with_top1 = with_probs.assign(top1=[2, 2, 0, 3])
  assert metrics.allocation_entropy(with_top1, WIDTH) == pytest.approx(
      (0 + 0.5) / 2)


def test_tokens_routed_nowhere_are_left_out():
  # A ReMoE token with every gate at 0: choices -1, weights 0, p = 0.
  frame = pd.concat([trace(), pd.DataFrame([{
      'sequence': 1, 'position': 2, 'domain': 1, 'choice_0': -1,
      'choice_1': -1, 'weight_0': 0.0, 'weight_1': 0.0,
      **{f'prob_{e}': 0.0 for e in range(WIDTH)}}])], ignore_index=True)
  np.testing.assert_array_equal(metrics.top1(frame)[-1], -1)
  base = trace()
  for name in ('weight_entropy', 'router_margin', 'h_total'):
    assert getattr(metrics, name)(frame) == pytest.approx(
        getattr(metrics, name)(base)), name
  # Top-1 by prob_ (all 0.25: argmax 0) for the other tokens.
  assert metrics.allocation_entropy(frame, WIDTH) == pytest.approx(
      metrics.allocation_entropy(base, WIDTH))
  np.testing.assert_allclose(metrics.selection_frequency(frame, WIDTH),
                             [2 / 7, 3 / 7, 1 / 7, 1 / 7])
  nowhere = frame.iloc[[-1]]
  assert math.isnan(metrics.allocation_entropy(nowhere, WIDTH))
  assert math.isnan(metrics.weight_entropy(nowhere))


def test_one_slot_per_token_has_no_margin():
  frame = trace().drop(columns=['choice_1', 'weight_1'])
  assert metrics.margins(frame).size == 0
  assert math.isnan(metrics.router_margin(frame))
  assert metrics.weight_entropy(frame) == 0.0


def test_switch_fraction_is_position_sensitive():
  # LibMoE's VLM change rate counts slot positions: token 0 swapping its two
  # experts is 2 changed positions of 8, though the (token, expert) pairs
  # are the same (change_rate 0).
  before = trace()
  swapped = before.copy()
  swapped.loc[0, ['choice_0', 'choice_1']] = [1, 0]
  assert metrics.change_rate(before, swapped, WIDTH) == 0.0
  assert metrics.switch_fraction(before, swapped) == pytest.approx(2 / 8)
  assert metrics.position_match(swapped, before) == pytest.approx(6 / 8)
  # Token 0's second slot 1 -> 2: one position of 8.
  assert metrics.switch_fraction(before, trace(first_token=(0, 2))) == (
      pytest.approx(1 / 8))
  with pytest.raises(ValueError, match='different tokens'):
    metrics.switch_fraction(before, before.iloc[:3])
