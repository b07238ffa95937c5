"""Golden tests of moe_jax.moe.metrics.routing_stats (algorithms.md §9).

A hand-built RouterOutput (T=4 tokens, E'=4, K=2) with every expected value
worked out by hand.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.moe import metrics
from moe_jax.moe.routers.base import RouterOutput


def entropy(q):
  return -sum(v * math.log(v) for v in q if v > 0)


CHOICE = [[0, 1],
          [0, 2],
          [0, -1],      # an inactive slot (ReMoE / HyperRouter)
          [1, 0]]
WEIGHT = [[0.7, 0.3],
          [0.8, 0.4],   # un-normalised (sigmoid with normalize_topk=False)
          [1.0, 0.0],
          [-0.6, 0.4]]  # signed (TC-MoE negative copy)
PROBS = [[0.5, 0.5, 0.0, 0.0],
         [0.25, 0.25, 0.25, 0.25],
         [1.0, 0.0, 0.0, 0.0],
         [0.1, 0.2, 0.3, 0.4]]


def make_out(choice=CHOICE, weight=WEIGHT, probs=PROBS, stats=None):
  choice = jnp.asarray(choice, jnp.int32)
  probs = jnp.asarray(probs, jnp.float32)
  return RouterOutput(
      expert_index=jnp.where(choice >= 0, choice, 4), weight=jnp.asarray(
          weight, jnp.float32), choice=choice, probs=probs, logits=probs,
      balance_eta=jnp.ones(probs.shape[-1]), stats=stats or {})


# Counts by hand: e0 <- t0, t1, t2, t3 = 4; e1 <- t0, t3 = 2; e2 <- t1 = 1;
# e3 <- none = 0. Total 7 selections, mean 7/4 per expert.
COUNTS = [4.0, 2.0, 1.0, 0.0]


def test_counts_load_and_dead_experts():
  s = metrics.routing_stats(make_out())
  np.testing.assert_array_equal(s['expert_counts'], COUNTS)
  np.testing.assert_allclose(s['expert_load'], [4 / 7, 2 / 7, 1 / 7, 0.0],
                             rtol=1e-6)
  assert float(s['dead_experts']) == 1.0


def test_max_mean_load_and_cv():
  s = metrics.routing_stats(make_out())
  mean = 7 / 4
  np.testing.assert_allclose(s['max_mean_load'], 4 / mean, rtol=1e-6)
  # Population std: squared deviations 2.25², 0.25², 0.75², 1.75².
  var = (2.25 ** 2 + 0.25 ** 2 + 0.75 ** 2 + 1.75 ** 2) / 4
  np.testing.assert_allclose(s['load_cv'], math.sqrt(var) / mean, rtol=1e-6)


def test_routing_entropy():
  s = metrics.routing_stats(make_out())
  expected = (math.log(2) + math.log(4) + 0.0
              + entropy([0.1, 0.2, 0.3, 0.4])) / 4
  np.testing.assert_allclose(s['routing_entropy'], expected, rtol=1e-6)


def test_weight_entropy_and_margin_use_normalised_absolute_weights():
  s = metrics.routing_stats(make_out())
  # |w| / Σ|w| per token: [.7 .3], [2/3 1/3], [1 0], [.6 .4].
  expected_h = (entropy([0.7, 0.3]) + entropy([2 / 3, 1 / 3]) + 0.0
                + entropy([0.6, 0.4])) / 4
  np.testing.assert_allclose(s['weight_entropy'], expected_h, rtol=1e-6)
  expected_margin = ((0.7 - 0.3) + (2 / 3 - 1 / 3) + (1.0 - 0.0)
                     + (0.6 - 0.4)) / 4
  np.testing.assert_allclose(s['router_margin'], expected_margin, rtol=1e-6)


def test_margin_sorts_slots():
  # Slot order need not be descending: the margin is w_(1) - w_(2).
  s = metrics.routing_stats(make_out(weight=[[0.3, 0.7]] * 4))
  np.testing.assert_allclose(s['router_margin'], 0.4, rtol=1e-6)


def test_balanced_routing():
  choice = [[0, 1], [2, 3], [1, 0], [3, 2]]
  s = metrics.routing_stats(make_out(choice=choice,
                                     weight=[[0.5, 0.5]] * 4,
                                     probs=[[0.25] * 4] * 4))
  np.testing.assert_array_equal(s['expert_counts'], [2, 2, 2, 2])
  assert float(s['dead_experts']) == 0.0
  np.testing.assert_allclose(s['max_mean_load'], 1.0, rtol=1e-6)
  np.testing.assert_allclose(s['load_cv'], 0.0, atol=1e-7)
  np.testing.assert_allclose(s['routing_entropy'], math.log(4), rtol=1e-6)
  np.testing.assert_allclose(s['weight_entropy'], math.log(2), rtol=1e-6)
  np.testing.assert_allclose(s['router_margin'], 0.0, atol=1e-7)


def test_single_slot_has_no_margin_and_passes_router_stats():
  out = make_out(choice=[[0], [1], [1], [3]], weight=[[1.0]] * 4,
                 stats={'remoe_sparsity': jnp.asarray(0.25)})
  s = metrics.routing_stats(out)
  assert 'router_margin' not in s
  np.testing.assert_array_equal(s['expert_counts'], [1, 2, 0, 1])
  np.testing.assert_allclose(s['weight_entropy'], 0.0, atol=1e-7)
  np.testing.assert_allclose(s['remoe_sparsity'], 0.25)


def test_jit_matches_eager():
  out = make_out()
  eager = metrics.routing_stats(out)
  jitted = jax.jit(metrics.routing_stats)(out)
  assert set(eager) == set(jitted)
  for k in eager:
    np.testing.assert_allclose(jitted[k], eager[k], rtol=1e-6, err_msg=k)


def test_allocation_entropy_per_sequence_by_hand():
  # Two sequences of 2 tokens. Top-1 (argmax of probs): t0 -> e0, t1 -> e0
  # (ties resolve to the first index), t2 -> e0, t3 -> e3.
  # Sequence 0: h = [2, 0, 0, 0] -> H = 0. Sequence 1: h = [1, 0, 0, 1] ->
  # H = ln 2. Normalised by ln E' = ln 4 and averaged: (0 + ln2/ln4) / 2 = 0.25.
  s = metrics.routing_stats(make_out(), num_sequences=2)
  np.testing.assert_allclose(float(s['allocation_entropy']), 0.25, rtol=1e-6)
  # One sequence of 4 tokens: h = [3, 0, 0, 1] -> H(3/4, 1/4) / ln 4.
  whole = metrics.routing_stats(make_out(), num_sequences=1)
  expected = entropy([0.75, 0.25]) / math.log(4)
  np.testing.assert_allclose(float(whole['allocation_entropy']), expected,
                             rtol=1e-6)


def test_gate_softmax_overrides_probs_for_analysis():
  # Sigmoid routers balance on the normalised sigmoid but LibMoE logs softmax(z)
  # (algorithms.md §9): routing entropy must read gate_softmax when given.
  gate = jnp.full((4, 4), 0.25, jnp.float32)
  out = make_out().replace(gate_softmax=gate)
  s = metrics.routing_stats(out)
  np.testing.assert_allclose(float(s['routing_entropy']), math.log(4),
                             rtol=1e-6)


def test_sigmoid_router_logs_softmax_of_logits():
  from moe_jax.moe.routers import base, softmax
  cfg = base.RouterConfig(num_experts=4, top_k=2, d_model=3)
  params = {'w': jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)),
                             jnp.float32)}
  x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)), jnp.float32)
  out = softmax.route_sigmoid(params, {}, x, cfg)
  z = np.asarray(x, np.float64) @ np.asarray(params['w'], np.float64)
  expected = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(out.gate_softmax), expected,
                             rtol=1e-5, atol=1e-6)
