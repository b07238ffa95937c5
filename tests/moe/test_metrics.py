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


def test_tokens_routed_nowhere_are_left_out():
  # Token 2 routed nowhere (a ReMoE token with every gate at 0): no top-1,
  # no weights. Without it: top-1 of t0, t1, t3 = e0, e0, e3 in one sequence
  # -> H(2/3, 1/3) / ln 4; weight entropy and margin over t0, t1, t3.
  probs = [p if i != 2 else [0.0] * 4 for i, p in enumerate(PROBS)]
  out = make_out(choice=[CHOICE[0], CHOICE[1], [-1, -1], CHOICE[3]],
                 weight=[WEIGHT[0], WEIGHT[1], [0.0, 0.0], WEIGHT[3]],
                 probs=probs)
  np.testing.assert_array_equal(metrics.top1_choice(out.probs), [0, 0, -1, 3])
  s = metrics.routing_stats(out)
  np.testing.assert_allclose(float(s['allocation_entropy']),
                             entropy([2 / 3, 1 / 3]) / math.log(4), rtol=1e-6)
  w = [[0.7, 0.3], [2 / 3, 1 / 3], [0.6, 0.4]]
  np.testing.assert_allclose(float(s['weight_entropy']),
                             np.mean([entropy(q) for q in w]), rtol=1e-6)
  np.testing.assert_allclose(float(s['router_margin']),
                             np.mean([q[0] - q[1] for q in w]), rtol=1e-6)
  # A sequence with no routed token adds no allocation entropy term:
  # sequence 0 top-1 e0, e1 -> ln 2 / ln 4 = 0.5; sequence 1 (t2, t3 both
  # routed nowhere) is left out, not averaged in as 0.
  none = [0.0] * 4
  two = make_out(choice=[CHOICE[0], CHOICE[1], [-1, -1], [-1, -1]],
                 weight=[WEIGHT[0], WEIGHT[1], [0.0, 0.0], [0.0, 0.0]],
                 probs=[PROBS[0], [0.1, 0.6, 0.2, 0.1], none, none])
  s2 = metrics.routing_stats(two, num_sequences=2)
  np.testing.assert_allclose(float(s2['allocation_entropy']), 0.5, rtol=1e-6)


def test_slot_weights_feed_the_weight_statistics():
  # MoE++ zeroes `weight` on copy / constant slots (served outside the
  # grouped matmul); the statistics read the slot weights.
  slot = jnp.asarray([[0.6, 0.4]] * 4, jnp.float32)
  out = make_out(weight=[[0.6, 0.0]] * 4).replace(slot_weight=slot)
  s = metrics.routing_stats(out)
  np.testing.assert_allclose(float(s['weight_entropy']), entropy([.6, .4]),
                             rtol=1e-6)
  np.testing.assert_allclose(float(s['router_margin']), 0.2, rtol=1e-5)


def test_moe_plus_plus_layer_traces_every_slot_weight():
  # zero_weight_mode 'keep': the top-k softmax renormalised over all k
  # slots, FFN or special (algorithms.md §3.9), computed here from the
  # router's logits; the combine weight keeps only the FFN slots.
  from moe_jax.moe import layer as layer_lib
  block = layer_lib.MoEBlock(
      d_model=8, num_experts=3, top_k=3, expert_width=4,
      router='moe_plus_plus',
      router_options=dict(n_const=1, n_copy=1, n_zero=1,
                          zero_weight_mode='keep', init_std=1.0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, 8)),
                  jnp.float32)
  variables = block.init(jax.random.PRNGKey(0), x)
  _, aux = block.apply(variables, x)
  z = np.asarray(aux['router_logits'], np.float64)                # [T, 6]
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  choice = np.asarray(aux['routing']['choice'])
  top = np.take_along_axis(p, choice, axis=-1)
  np.testing.assert_allclose(np.asarray(aux['routing']['weight']),
                             top / top.sum(-1, keepdims=True), rtol=1e-5)
  assert (choice >= 3).any()          # special slots were chosen
  np.testing.assert_array_equal(np.asarray(aux['routing']['top1']),
                                p.argmax(-1))
