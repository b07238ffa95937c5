"""Golden tests of moe_jax.moe.losses (algorithms.md §2.3, §3.9-3.11).

Every expected value is worked out by hand in the test, on a 2-sequence x
3-token example (B=2, S=3, T=6) written out as literals, following the formulas
of algorithms.md, never by calling library code.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe import losses
from moe_jax.moe import router as router_lib
from moe_jax.moe.routers.base import RouterOutput

B = 2  # sequences; every example has S = 3 tokens per sequence, T = 6.


def make_out(probs, choice, logits=None, eta=None):
  probs = jnp.asarray(probs, jnp.float32)
  choice = jnp.asarray(choice, jnp.int32)
  logits = probs if logits is None else jnp.asarray(logits, jnp.float32)
  eta = jnp.ones(probs.shape[-1]) if eta is None else jnp.asarray(eta)
  return RouterOutput(
      expert_index=jnp.where(choice >= 0, choice, probs.shape[-1]),
      weight=jnp.ones(choice.shape, jnp.float32), choice=choice, probs=probs,
      logits=logits, balance_eta=eta.astype(jnp.float32))


# ------------------------------------------------------- balance (E' = 4, K = 2)

PROBS = [
    # sequence 0
    [0.50, 0.25, 0.15, 0.10],
    [0.10, 0.60, 0.20, 0.10],
    [0.40, 0.10, 0.30, 0.20],
    # sequence 1
    [0.05, 0.15, 0.30, 0.50],
    [0.25, 0.05, 0.10, 0.60],
    [0.20, 0.30, 0.40, 0.10],
]
CHOICE = [[0, 1], [1, 2], [0, 2],
          [3, 2], [3, 0], [2, 1]]

# P̄_{b,e} = mean_t p_{b,t,e}, column sums written out by hand.
PBAR0 = [(0.50 + 0.10 + 0.40) / 3, (0.25 + 0.60 + 0.10) / 3,
         (0.15 + 0.20 + 0.30) / 3, (0.10 + 0.10 + 0.20) / 3]
PBAR1 = [(0.05 + 0.25 + 0.20) / 3, (0.15 + 0.05 + 0.30) / 3,
         (0.30 + 0.10 + 0.40) / 3, (0.50 + 0.60 + 0.10) / 3]
# all_k counts (hand-counted from CHOICE): seq 0 -> e0: t0,t2; e1: t0,t1;
# e2: t1,t2; e3: none. seq 1 -> e0: t4; e1: t5; e2: t3,t5; e3: t3,t4.
F0_ALLK = [2 / 6, 2 / 6, 2 / 6, 0 / 6]   # count / (S*K)
F1_ALLK = [1 / 6, 1 / 6, 2 / 6, 2 / 6]
# top1 counts (first slot only): seq 0 -> 0, 1, 0; seq 1 -> 3, 3, 2.
F0_TOP1 = [2 / 3, 1 / 3, 0 / 3, 0 / 3]
F1_TOP1 = [0 / 3, 0 / 3, 1 / 3, 2 / 3]


def test_balance_all_k_sequence_golden():
  # L = mean_b Σ_e (E f_{b,e}) P̄_{b,e}, E = 4.
  seq0 = 4 * (2 / 6 * PBAR0[0] + 2 / 6 * PBAR0[1] + 2 / 6 * PBAR0[2]
              + 0 / 6 * PBAR0[3])
  seq1 = 4 * (1 / 6 * PBAR1[0] + 1 / 6 * PBAR1[1] + 2 / 6 * PBAR1[2]
              + 2 / 6 * PBAR1[3])
  expected = (seq0 + seq1) / 2
  assert expected == pytest.approx(40.8 / 36)   # the same sum, simplified by hand
  got = losses.balance(make_out(PROBS, CHOICE), B, count_mode='all_k',
                       group='sequence')
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_balance_top1_sequence_golden():
  seq0 = 4 * (2 / 3 * PBAR0[0] + 1 / 3 * PBAR0[1])
  seq1 = 4 * (1 / 3 * PBAR1[2] + 2 / 3 * PBAR1[3])
  expected = (seq0 + seq1) / 2
  assert expected == pytest.approx(24.6 / 18)
  got = losses.balance(make_out(PROBS, CHOICE), B, count_mode='top1',
                       group='sequence')
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_balance_all_k_batch_golden():
  # One group of 6 tokens: counts [3, 3, 4, 2] of 12 slots.
  pbar = [(0.50 + 0.10 + 0.40 + 0.05 + 0.25 + 0.20) / 6,
          (0.25 + 0.60 + 0.10 + 0.15 + 0.05 + 0.30) / 6,
          (0.15 + 0.20 + 0.30 + 0.30 + 0.10 + 0.40) / 6,
          (0.10 + 0.10 + 0.20 + 0.50 + 0.60 + 0.10) / 6]
  expected = 4 * (3 / 12 * pbar[0] + 3 / 12 * pbar[1] + 4 / 12 * pbar[2]
                  + 2 / 12 * pbar[3])
  assert expected == pytest.approx(71.4 / 72)
  got = losses.balance(make_out(PROBS, CHOICE), B, count_mode='all_k',
                       group='batch')
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_balance_top1_batch_golden():
  # First-slot choices over the batch: 0, 1, 0, 3, 3, 2 -> [2, 1, 1, 2] of 6.
  pbar = [1.5 / 6, 1.45 / 6, 1.45 / 6, 1.6 / 6]
  expected = 4 * (2 / 6 * pbar[0] + 1 / 6 * pbar[1] + 1 / 6 * pbar[2]
                  + 2 / 6 * pbar[3])
  got = losses.balance(make_out(PROBS, CHOICE), B, count_mode='top1',
                       group='batch')
  np.testing.assert_allclose(got, expected, rtol=1e-6)


ETA = [1.0, 1.0, 0.75, 0.75]   # MoE++: 2 FFN experts, then 2 zero-compute ones.


def test_balance_heterogeneous_eta_golden():
  # L = mean_b Σ_e η_e (E' f_{b,e}) P̄_{b,e}  (§3.9), E' = 4, τ = 0.75.
  seq0 = 4 * (1.0 * 2 / 6 * PBAR0[0] + 1.0 * 2 / 6 * PBAR0[1]
              + 0.75 * 2 / 6 * PBAR0[2] + 0.75 * 0 / 6 * PBAR0[3])
  seq1 = 4 * (1.0 * 1 / 6 * PBAR1[0] + 1.0 * 1 / 6 * PBAR1[1]
              + 0.75 * 2 / 6 * PBAR1[2] + 0.75 * 2 / 6 * PBAR1[3])
  expected = (seq0 + seq1) / 2
  got = losses.balance(make_out(PROBS, CHOICE, eta=ETA), B)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  # The τ-weighted terms really are smaller than the unweighted ones.
  assert expected < losses.balance(make_out(PROBS, CHOICE), B)


@pytest.mark.parametrize('count_mode,group', [
    ('all_k', 'sequence'), ('top1', 'sequence'), ('all_k', 'batch')])
def test_balance_balanced_router_gives_one(count_mode, group):
  # Every sequence spreads its slots (and its first slots) evenly over the 4
  # experts; the per-token probabilities are skewed but rotate over experts.
  probs = [[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1],
           [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.1, 0.7]] * 2
  choice = [[0, 1], [1, 2], [2, 3], [3, 0]] * 2
  out = make_out(probs, choice)
  got = losses.balance(out, 2, count_mode=count_mode, group=group)
  np.testing.assert_allclose(got, 1.0, rtol=1e-6)
  alpha = 0.01
  np.testing.assert_allclose(alpha * got, alpha, rtol=1e-6)


def test_balance_imbalanced_router_exceeds_one():
  # All slots on expert 0 while expert 0 also holds most probability mass.
  probs = [[0.7, 0.1, 0.1, 0.1]] * 6
  choice = [[0, 1]] * 6
  got = losses.balance(make_out(probs, choice), B)
  # f = [1/2, 1/2, 0, 0], P̄ = probs row: 4 (0.5 0.7 + 0.5 0.1) = 1.6.
  np.testing.assert_allclose(got, 1.6, rtol=1e-6)


def test_balance_gradient_flows_through_probs_only():
  """dL/dp_{b,t,e} = η_e E' f_{b,e} / (S B); nothing reaches the logits."""
  probs = jnp.asarray(PROBS, jnp.float32)
  logits = jnp.log(probs) + 0.3

  def loss(p, z):
    return losses.balance(make_out(p, CHOICE, logits=z, eta=ETA), B)

  d_probs, d_logits = jax.grad(loss, argnums=(0, 1))(probs, logits)
  s = 3
  expected = np.zeros((6, 4))
  for t in range(6):
    f = F0_ALLK if t < 3 else F1_ALLK
    for e in range(4):
      expected[t, e] = ETA[e] * 4 * f[e] / (s * B)
  np.testing.assert_allclose(d_probs, expected, rtol=1e-6)
  np.testing.assert_array_equal(d_logits, np.zeros((6, 4)))


def test_balance_top1_gradient_uses_top1_counts():
  probs = jnp.asarray(PROBS, jnp.float32)
  d_probs = jax.grad(lambda p: losses.balance(
      make_out(p, CHOICE), B, count_mode='top1'))(probs)
  expected = np.zeros((6, 4))
  for t in range(6):
    f = F0_TOP1 if t < 3 else F1_TOP1
    for e in range(4):
      expected[t, e] = 4 * f[e] / (3 * B)
  np.testing.assert_allclose(d_probs, expected, rtol=1e-6)


def test_balance_rejects_unknown_modes():
  out = make_out(PROBS, CHOICE)
  with pytest.raises(ValueError, match='count_mode'):
    losses.balance(out, B, count_mode='top2')
  with pytest.raises(ValueError, match='group'):
    losses.balance(out, B, group='token')


# ---------------------------------------------------- z-loss and entropy modes

# logits = ln U + c_t: softmax rows are U / ΣU, logsumexp = ln ΣU + c_t.
U = [[1, 2, 3, 4], [4, 4, 1, 1], [2, 2, 2, 2],
     [1, 1, 1, 5], [6, 1, 1, 2], [3, 3, 2, 2]]
U_SUM = [10, 10, 8, 8, 10, 10]
SHIFT = [0.0, 1.0, -2.0, 0.5, 0.0, 3.0]
LOGITS = [[math.log(u) + c for u in row] for row, c in zip(U, SHIFT)]
SOFTMAX = [[u / s for u in row] for row, s in zip(U, U_SUM)]


def entropy(q):
  """H(q) = -Σ q ln q (nats), 0 ln 0 = 0."""
  return -sum(v * math.log(v) for v in q if v > 0)


def logits_out():
  return make_out(SOFTMAX, [[0, 1]] * 6, logits=LOGITS)


def test_z_loss_golden():
  lse = [math.log(s) + c for s, c in zip(U_SUM, SHIFT)]
  expected = sum(v * v for v in lse) / 6
  np.testing.assert_allclose(losses.z_loss(logits_out(), B), expected,
                             rtol=1e-6)


def test_entropy_step_golden():
  # -mean_t H(softmax(z_t)); H of [.1 .2 .3 .4], [.4 .4 .1 .1], uniform, ...
  expected = -sum(entropy(q) for q in SOFTMAX) / 6
  assert entropy(SOFTMAX[2]) == pytest.approx(math.log(4))
  np.testing.assert_allclose(losses.entropy_step(logits_out(), B), expected,
                             rtol=1e-6)


def test_entropy_time_golden():
  # -mean_b H(mean_t softmax(z_{b,t})): per-sequence marginals, rows 0-2, 3-5.
  m0 = [(SOFTMAX[0][e] + SOFTMAX[1][e] + SOFTMAX[2][e]) / 3 for e in range(4)]
  m1 = [(SOFTMAX[3][e] + SOFTMAX[4][e] + SOFTMAX[5][e]) / 3 for e in range(4)]
  expected = -(entropy(m0) + entropy(m1)) / 2
  np.testing.assert_allclose(losses.entropy_time(logits_out(), B), expected,
                             rtol=1e-6)
  # Grouping matters: the marginal of tokens (0, 2, 4) / (1, 3, 5) differs.
  wrong0 = [(SOFTMAX[0][e] + SOFTMAX[2][e] + SOFTMAX[4][e]) / 3
            for e in range(4)]
  wrong1 = [(SOFTMAX[1][e] + SOFTMAX[3][e] + SOFTMAX[5][e]) / 3
            for e in range(4)]
  assert abs(expected + (entropy(wrong0) + entropy(wrong1)) / 2) > 1e-3


def test_entropy_global_golden():
  m = [sum(SOFTMAX[t][e] for t in range(6)) / 6 for e in range(4)]
  expected = -entropy(m)
  np.testing.assert_allclose(losses.entropy_global(logits_out(), B), expected,
                             rtol=1e-6)
  # The batch marginal is flatter than the per-sequence ones.
  assert losses.entropy_global(logits_out(), B) < losses.entropy_time(
      logits_out(), B)


# ------------------------------------------------ TC-MoE (E = 2, N = 2 null)

# Slots: 0, 1 positive copies; 2, 3 negative copies; 4, 5 null.
TC_PROBS = [
    [0.40, 0.20, 0.10, 0.10, 0.15, 0.05],
    [0.10, 0.30, 0.30, 0.10, 0.10, 0.10],
    [0.20, 0.10, 0.10, 0.20, 0.30, 0.10],
    [0.05, 0.05, 0.10, 0.40, 0.20, 0.20],
    [0.30, 0.10, 0.05, 0.05, 0.25, 0.25],
    [0.10, 0.20, 0.30, 0.20, 0.10, 0.10],
]
TC_CHOICE = [[0, 1], [1, 2], [4, 0],
             [3, 4], [0, 5], [2, 1]]
# p̃ = p over the 2E non-null slots, renormalised (non-null sums by hand).
TC_PT = [
    [0.40 / 0.8, 0.20 / 0.8, 0.10 / 0.8, 0.10 / 0.8],
    [0.10 / 0.8, 0.30 / 0.8, 0.30 / 0.8, 0.10 / 0.8],
    [0.20 / 0.6, 0.10 / 0.6, 0.10 / 0.6, 0.20 / 0.6],
    [0.05 / 0.6, 0.05 / 0.6, 0.10 / 0.6, 0.40 / 0.6],
    [0.30 / 0.5, 0.10 / 0.5, 0.05 / 0.5, 0.05 / 0.5],
    [0.10 / 0.8, 0.20 / 0.8, 0.30 / 0.8, 0.20 / 0.8],
]


def tc_pair(rows):
  """P̄⁺_e + P̄⁻_e for e = 0, 1 over the given token rows."""
  n = len(rows)
  e0 = sum(TC_PT[t][0] + TC_PT[t][2] for t in rows) / n
  e1 = sum(TC_PT[t][1] + TC_PT[t][3] for t in rows) / n
  return e0, e1


def tc_out(probs=TC_PROBS, choice=TC_CHOICE):
  return make_out(probs, choice)


def test_tc_balance_golden():
  # Row counts by base expert (choice mod E, nulls skipped), from TC_CHOICE:
  # seq 0: e0 <- 0 (t0), 2 (t1), 0 (t2) = 3; e1 <- 1 (t0), 1 (t1) = 2; nonnull 5.
  # seq 1: e0 <- 0 (t4), 2 (t5) = 2; e1 <- 3 (t3), 1 (t5) = 2; nonnull 4.
  p0, p1 = tc_pair([0, 1, 2]), tc_pair([3, 4, 5])
  seq0 = 2 * (3 / 5 * p0[0] + 2 / 5 * p0[1])
  seq1 = 2 * (2 / 4 * p1[0] + 2 / 4 * p1[1])
  expected = (seq0 + seq1) / 2
  got = losses.tc_balance(tc_out(), B, num_experts=2)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_tc_balance_global_counts_parity_golden():
  # D7 quirk: global counts [5, 4] broadcast to each row / the row's nonnull,
  # no factor E.
  p0, p1 = tc_pair([0, 1, 2]), tc_pair([3, 4, 5])
  seq0 = 5 / 5 * p0[0] + 4 / 5 * p0[1]
  seq1 = 5 / 4 * p1[0] + 4 / 4 * p1[1]
  expected = (seq0 + seq1) / 2
  got = losses.tc_balance(tc_out(), B, num_experts=2, global_counts=True)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_tc_balance_all_null_row_contributes_zero():
  choice = [[0, 1], [1, 2], [4, 0],
            [4, 5], [5, 4], [4, 5]]          # sequence 1: only null slots
  p0 = tc_pair([0, 1, 2])
  expected = (2 * (3 / 5 * p0[0] + 2 / 5 * p0[1]) + 0.0) / 2
  got = losses.tc_balance(tc_out(choice=choice), B, num_experts=2)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  assert np.isfinite(losses.tc_balance(tc_out(choice=choice), B,
                                       num_experts=2, global_counts=True))


def test_tc_balance_balanced_router_gives_one():
  # Each sequence's non-null slots split evenly over the 2 base experts
  # (positive and negative copies together); any probabilities.
  probs = np.random.default_rng(0).dirichlet(np.ones(6), size=6)
  choice = [[0, 3], [1, 2], [4, 5],
            [2, 4], [1, 5], [0, 3]]
  got = losses.tc_balance(make_out(probs, choice), B, num_experts=2)
  np.testing.assert_allclose(got, 1.0, rtol=1e-5)
  np.testing.assert_allclose(0.01 * got, 0.01, rtol=1e-5)


def test_tc_reward_golden():
  # -mean_t Σ_null p: null masses 0.20, 0.20, 0.40, 0.40, 0.50, 0.20.
  expected = -(0.20 + 0.20 + 0.40 + 0.40 + 0.50 + 0.20) / 6
  np.testing.assert_allclose(losses.tc_reward(tc_out(), B, num_experts=2),
                             expected, rtol=1e-6)


# ---------------------------------------------------------- ReMoE (E = 4, k = 2)

REMOE_Z = [
    [1.0, -0.5, 0.5, -1.0],
    [0.0, 2.0, -0.3, 0.4],     # exactly 0 is inactive (R > 0 is strict)
    [-1.0, -2.0, 0.3, 0.6],
    [0.2, 0.3, 0.4, 0.0],
    [1.5, -0.2, -0.2, -0.2],
    [-0.5, 0.7, 0.1, 0.9],
]
# Per expert, Σ_t R_{t,e} and #{t : R_{t,e} > 0}, by hand:
REMOE_MASS = [1.0 + 0.2 + 1.5, 2.0 + 0.3 + 0.7, 0.5 + 0.3 + 0.4 + 0.1,
              0.4 + 0.6 + 0.9]
REMOE_ACTIVE = [3, 3, 4, 3]


def remoe_out(z=REMOE_Z):
  return make_out(np.zeros((6, 4)), [[0, 1]] * 6, logits=z)


def test_remoe_l1_golden():
  # L = E / (k N²) Σ_e (Σ_t R_te) #{t : R_te > 0}, N = 6.
  expected = 4 / (2 * 6 * 6) * sum(m * a for m, a in zip(REMOE_MASS,
                                                          REMOE_ACTIVE))
  assert expected == pytest.approx(4 / 72 * 28.0)
  got = losses.remoe_l1(remoe_out(), B, top_k=2)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_remoe_l1_libmoe_parity_golden():
  # b5d10f1: E² mean_{t,e}(R) nnz / N, two scalars multiplied (D8).
  mean_r = sum(REMOE_MASS) / 24
  nnz = sum(REMOE_ACTIVE)
  expected = 4 * 4 * mean_r * nnz / 6
  got = losses.remoe_l1(remoe_out(), B, top_k=2, libmoe=True)
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_remoe_l1_gradient_only_through_relu_values():
  # dL/dz_te = E/(k N²) #{t : R_te > 0} 1[z_te > 0]; counts carry no gradient.
  z = jnp.asarray(REMOE_Z, jnp.float32)
  grad = jax.grad(lambda z: losses.remoe_l1(remoe_out(z), B, top_k=2))(z)
  expected = np.zeros((6, 4))
  for t in range(6):
    for e in range(4):
      if REMOE_Z[t][e] > 0:
        expected[t, e] = 4 / (2 * 36) * REMOE_ACTIVE[e]
  np.testing.assert_allclose(grad, expected, rtol=1e-6)


# --------------------------------------------------------- losses.compute

def test_compute_reads_parity_flags():
  tc = router_lib.make_config('tc_moe', num_experts=2, top_k=2, d_model=4)
  tc_parity = router_lib.make_config('tc_moe', num_experts=2, top_k=2,
                                     d_model=4,
                                     parity={'tc_global_counts': True})
  got = losses.compute(('tc_balance', 'tc_reward'), tc_out(), B, tc)
  got_parity = losses.compute(('tc_balance',), tc_out(), B, tc_parity)
  np.testing.assert_allclose(
      got['tc_balance'], losses.tc_balance(tc_out(), B, num_experts=2))
  np.testing.assert_allclose(
      got_parity['tc_balance'],
      losses.tc_balance(tc_out(), B, num_experts=2, global_counts=True))
  assert abs(float(got['tc_balance'] - got_parity['tc_balance'])) > 1e-3

  rm = router_lib.make_config('remoe', num_experts=4, top_k=2, d_model=4)
  rm_parity = router_lib.make_config('remoe', num_experts=4, top_k=2,
                                     d_model=4, parity={'remoe_libmoe': True})
  np.testing.assert_allclose(
      losses.compute(('remoe_l1',), remoe_out(), B, rm)['remoe_l1'],
      4 / 72 * 28.0, rtol=1e-6)
  np.testing.assert_allclose(
      losses.compute(('remoe_l1',), remoe_out(), B, rm_parity)['remoe_l1'],
      16 * (sum(REMOE_MASS) / 24) * 13 / 6, rtol=1e-6)


def test_compute_passes_balance_modes_and_rejects_unknown_names():
  cfg = router_lib.make_config('smoe', num_experts=4, top_k=2, d_model=4)
  out = make_out(PROBS, CHOICE)
  got = losses.compute(('balance',), out, B, cfg, count_mode='top1',
                       group='sequence')
  np.testing.assert_allclose(got['balance'], 24.6 / 18, rtol=1e-6)
  with pytest.raises(ValueError, match='losses'):
    losses.compute(('balance', 'nonexistent'), out, B, cfg)
