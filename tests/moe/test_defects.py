"""The defects of algorithms.md §4 that apply to the layer: each test shows the
correct moe_jax behaviour and, where a parity flag exists, that the flag
reproduces LibMoE's quirk. Expected values come from naive numpy code written
here from the formulas of algorithms.md §3, never from library code.

Not applicable here: D4 (a yaml mode string), D12 (SigLIP tower), D13/D14
(analysis scripts), D15/D16 (checkpoint and config infrastructure).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe import losses
from moe_jax.moe.layer import MoEBlock
from moe_jax.moe.router import ROUTERS, make_config
from moe_jax.moe.routers.base import RouterOutput

D, E, K, F = 8, 4, 2, 16


def np_softmax(z, axis=-1):
  z = np.asarray(z, np.float64)
  z = z - z.max(axis=axis, keepdims=True)
  ez = np.exp(z)
  return ez / ez.sum(axis=axis, keepdims=True)


def np_sigmoid(z):
  return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def np_topk(v, k):
  """Indices of the k largest entries per row, descending, ties to lower id."""
  return np.argsort(-np.asarray(v), axis=-1, kind='stable')[:, :k]


def route(name, params, x, state=None, **options):
  options.setdefault('num_experts', E)
  options.setdefault('top_k', K)
  options.setdefault('d_model', x.shape[-1])
  cfg = make_config(name, **options)
  return ROUTERS[name].route(params, state or {}, jnp.asarray(x, jnp.float32),
                             cfg), cfg


def init_block(block, x, seed=1, scale=0.5):
  """Variables of `block` filled with N(0, scale²) draws.

  Shapes come from jax.eval_shape: a jitted init would spend seconds compiling
  the PRNG calls, and every test below sets the values it depends on.
  """
  shapes = nn.meta.unbox(jax.eval_shape(block.init, jax.random.PRNGKey(0), x))
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jnp.asarray(scale * rng.normal(size=s.shape), s.dtype), shapes)


def with_router(variables, **router_params):
  params = dict(variables['params'])
  params['router'] = {'router': {k: jnp.asarray(v, jnp.float32)
                                 for k, v in router_params.items()}}
  return {**variables, 'params': params}


def x_tokens(b=2, s=4, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (b, s, D))


# ------------------------------------------------------------- D1 / D1b MoE++

# E = 4 FFN experts, then 1 constant (4), 1 copy (5), 1 zero (6): E' = 7.
MOEPP = dict(n_const=1, n_copy=1, n_zero=1, router_init='torch_default',
             gate_residual=False)


def moepp_block(**extra):
  return MoEBlock(d_model=D, num_experts=E, top_k=K, expert_width=F,
                  router='moe_plus_plus', backend='loop',
                  router_options={**MOEPP, **extra.pop('router_options', {})},
                  **extra)


def naive_moepp(variables, x, w, b, zero_mode='drop', in_scale=1.0):
  """Reference MoE++ forward by a loop over tokens and selected slots."""
  p_ = variables['params']
  w_in, w_out = np.asarray(p_['experts']['w_in']), np.asarray(
      p_['experts']['w_out'])
  gate, value = np.asarray(p_['constant']['gate']), np.asarray(
      p_['constant']['value'])
  xt = np.asarray(x, np.float64).reshape(-1, D)
  probs = np_softmax(xt @ w + b)
  y = np.zeros_like(xt)
  kinds = set()
  for t in range(xt.shape[0]):
    sel = np_topk(probs[t:t + 1], K)[0]
    g = probs[t, sel].copy()
    if zero_mode == 'drop':
      g = np.where(sel == 6, 0.0, g)
    g = g / g.sum()
    xin = in_scale * xt[t]
    for j, e in enumerate(sel):
      if e < E:
        kinds.add('ffn')
        y[t] += g[j] * (np.maximum(xin @ w_in[e], 0) @ w_out[e])
      elif e == 4:
        kinds.add('const')
        alpha = np_softmax(xin @ gate[0])
        y[t] += g[j] * (alpha[0] * xin + alpha[1] * value[0])
      elif e == 5:
        kinds.add('copy')
        y[t] += g[j] * xin
      else:
        kinds.add('zero')
  return y.reshape(np.shape(x)), kinds


def test_d1_moepp_special_experts_are_executed():
  x = x_tokens(2, 8)
  block = moepp_block()
  variables = init_block(block, x)
  rng = np.random.default_rng(0)
  w = rng.normal(size=(D, 7))
  b = np.array([0.0, 0.0, 0.0, 0.0, 1.0, 1.5, 1.0])
  variables = with_router(variables, w=w, b=b)
  y, _ = jax.jit(block.apply)(variables, x)
  expected, kinds = naive_moepp(variables, x, w, b)
  assert kinds == {'ffn', 'const', 'copy', 'zero'}   # the example covers all
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('zero_mode', ['drop', 'keep'])
def test_d1_moepp_copy_expert_and_zero_weight(zero_mode):
  # Every token selects copy (logit 5) and zero (logit 4).
  x = x_tokens()
  block = moepp_block(router_options={'zero_weight_mode': zero_mode})
  variables = with_router(init_block(block, x), w=np.zeros((D, 7)),
                          b=[0, 0, 0, 0, 0, 5.0, 4.0])
  y, _ = jax.jit(block.apply)(variables, x)
  # drop (reference): the zero slot's weight is dropped and the copy slot is
  # renormalised to 1, so y = x. keep (LibMoE VLM): y = e^5/(e^5+e^4) x.
  scale = 1.0 if zero_mode == 'drop' else np.exp(5) / (np.exp(5) + np.exp(4))
  np.testing.assert_allclose(y, scale * np.asarray(x), rtol=1e-5, atol=1e-6)


def test_d1_moepp_constant_expert():
  x = x_tokens()
  block = moepp_block()
  variables = with_router(init_block(block, x), w=np.zeros((D, 7)),
                          b=[0, 0, 0, 0, 5.0, 0, 4.0])
  y, _ = jax.jit(block.apply)(variables, x)
  gate = np.asarray(variables['params']['constant']['gate'])[0]   # [D, 2]
  v = np.asarray(variables['params']['constant']['value'])[0]
  xt = np.asarray(x, np.float64)
  alpha = np_softmax(xt @ gate)
  expected = alpha[..., :1] * xt + alpha[..., 1:] * v
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_moepp_mul_topk_parity_scales_expert_input():
  x = x_tokens()
  block = moepp_block(router_options={'parity': {'moepp_mul_topk': True}})
  variables = with_router(init_block(block, x), w=np.zeros((D, 7)),
                          b=[0, 0, 0, 0, 0, 5.0, 4.0])
  y, _ = jax.jit(block.apply)(variables, x)
  np.testing.assert_allclose(y, K * np.asarray(x), rtol=1e-5, atol=1e-6)


def test_d1b_zero_weight_dropped_and_renormalised():
  x = np.zeros((3, D))
  b = np.array([3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 2.0])   # FFN 0 and zero expert
  params = {'w': np.zeros((D, 7)), 'b': b}
  out, _ = route('moe_plus_plus', params, x, **MOEPP)
  np.testing.assert_array_equal(out.choice, [[0, 6]] * 3)
  np.testing.assert_array_equal(out.expert_index, [[0, E]] * 3)  # zero: no row
  np.testing.assert_allclose(out.weight, [[1.0, 0.0]] * 3, atol=1e-6)
  keep, _ = route('moe_plus_plus', params, x, zero_weight_mode='keep',
                  **MOEPP)
  p0 = np.exp(3) / (np.exp(3) + np.exp(2))
  # LibMoE VLM: the zero expert keeps its share (the FFN slot gets p0 only).
  np.testing.assert_allclose(keep.weight, [[p0, 0.0]] * 3, rtol=1e-5)


@pytest.mark.parametrize('num_experts', [4, 6])
def test_d1b_heterogeneous_eta_by_type_not_index(num_experts):
  cfg_opts = dict(n_const=2, n_copy=1, n_zero=1, hetero_tau=0.75)
  x = np.ones((2, D))
  width = num_experts + 4
  params = {'w': np.zeros((D, width)), 'gate_map': np.zeros((width, width))}
  out, _ = route('moe_plus_plus', params, x, num_experts=num_experts,
                 **cfg_opts)
  # LibMoE hard-codes index 4 (1.3); with E = 6 index 4 is an FFN expert.
  expected = [1.0] * num_experts + [0.75] * 4
  np.testing.assert_allclose(out.balance_eta, expected)


# ----------------------------------------------------------------- D2 / D3 XMoE

def xmoe_reference(params, x, tau, double):
  r = np.asarray(x, np.float64) @ np.asarray(params['w'])
  r_hat = r / np.maximum(np.linalg.norm(r, axis=-1, keepdims=True), 1e-4)
  s = r_hat @ np.asarray(params['embed']).T
  p = np_softmax(s / tau)
  p_sel = np_softmax(p) if double else p
  sel = np_topk(p_sel, K)
  top = np.take_along_axis(p_sel, sel, -1)
  return sel, top / top.sum(-1, keepdims=True), p, s


@pytest.mark.parametrize('double', [False, True])
def test_d2_xmoe_single_softmax_and_double_softmax_parity(double):
  cfg = make_config('xmoe', num_experts=E, top_k=K, d_model=D,
                    temperature=0.3)
  params, _ = ROUTERS['xmoe'].init(jax.random.PRNGKey(3), cfg)
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (6, D)))
  parity = {'xmoe_double_softmax': True} if double else {}
  out, _ = route('xmoe', params, x, temperature=0.3, parity=parity)
  sel, g, p, s = xmoe_reference(params, x, 0.3, double)
  np.testing.assert_array_equal(out.choice, sel)
  np.testing.assert_allclose(out.weight, g, rtol=1e-5)
  # The balance loss sees the τ-softmax and the z-loss the scores, either way.
  np.testing.assert_allclose(out.probs, p, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.logits, s, rtol=1e-5, atol=1e-6)


def test_d2_double_softmax_flattens_weights_but_keeps_selection():
  cfg = make_config('xmoe', num_experts=E, top_k=K, d_model=D,
                    temperature=0.3)
  params, _ = ROUTERS['xmoe'].init(jax.random.PRNGKey(3), cfg)
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(4), (6, D)))
  single, _ = route('xmoe', params, x, temperature=0.3)
  double, _ = route('xmoe', params, x, temperature=0.3,
                    parity={'xmoe_double_softmax': True})
  np.testing.assert_array_equal(single.choice, double.choice)
  dev_single = np.abs(np.asarray(single.weight) - 1 / K).mean()
  dev_double = np.abs(np.asarray(double.weight) - 1 / K).mean()
  assert dev_double < 0.5 * dev_single


def test_d3_standard_balance_loss_works_with_xmoe():
  x = x_tokens(2, 4)
  block = MoEBlock(d_model=D, num_experts=E, top_k=K, expert_width=F,
                   router='xmoe', backend='loop',
                   router_options={'temperature': 0.3})
  variables = init_block(block, x)
  rp = variables['params']['router']['router']
  embed = np.asarray(rp['embed'])
  rp = {'w': rp['w'],
        'embed': 1.5 * embed / np.linalg.norm(embed, axis=-1, keepdims=True)}
  variables = with_router(variables, **rp)
  _, aux = jax.jit(block.apply)(variables, x)
  assert 'balance' in aux['losses']       # the router's default loss
  sel, _, p, _ = xmoe_reference(rp, np.asarray(x).reshape(8, D), 0.3, False)
  expected = 0.0
  for b in range(2):
    rows = range(4 * b, 4 * b + 4)
    for e in range(E):
      f = sum(int(e in sel[t]) for t in rows) / (4 * K)
      pbar = sum(p[t, e] for t in rows) / 4
      expected += E * f * pbar / 2
  np.testing.assert_allclose(aux['losses']['balance'], expected, rtol=1e-5)


def test_xmoe_post_update_projects_embeddings_to_norm_1_5():
  cfg = make_config('xmoe', num_experts=E, top_k=K, d_model=D)
  params, state = ROUTERS['xmoe'].init(jax.random.PRNGKey(0), cfg)
  np.testing.assert_allclose(np.linalg.norm(params['embed'], axis=-1), 1.5,
                             rtol=1e-5)   # projected before the first forward
  drifted = np.asarray(params['embed']) * np.array([[0.5], [2.0], [1.1],
                                                    [0.9]])
  new, new_state = ROUTERS['xmoe'].post_update(
      {**params, 'embed': jnp.asarray(drifted)}, state, {}, cfg)
  np.testing.assert_allclose(np.linalg.norm(new['embed'], axis=-1), 1.5,
                             rtol=1e-5)
  unit = drifted / np.linalg.norm(drifted, axis=-1, keepdims=True)
  np.testing.assert_allclose(new['embed'], 1.5 * unit, rtol=1e-5)
  np.testing.assert_array_equal(new['w'], params['w'])
  assert new_state == state


# ------------------------------------------------------- D5 / D5b / D6 / D6c

def identity_router(e=E):
  return {'w': np.eye(e)}        # with d = E, the logits are x itself


DS_Z = np.array([[2.0, 1.0, 0.5, -1.0],
                 [0.0, 1.5, -0.5, 1.0],
                 [-1.0, 0.2, 0.8, 0.3],
                 [1.2, -0.3, 0.1, 0.9],
                 [0.4, 0.6, 2.2, -2.0],
                 [-0.7, 1.1, 0.0, 0.5]])


def test_d5_bias_changes_selection_not_weights():
  s = np_sigmoid(DS_Z)
  bias = np.array([0.0, 0.0, 0.0, 2.0])        # forces expert 3 everywhere
  plain, _ = route('deepseek_v3', identity_router(), DS_Z,
                   state={'bias': jnp.zeros(E)}, d_model=E)
  biased, _ = route('deepseek_v3', identity_router(), DS_Z,
                    state={'bias': jnp.asarray(bias)}, d_model=E)
  sel_plain = np_topk(s, K)
  sel_biased = np_topk(s + bias, K)
  assert np.all(sel_biased[:, 0] == 3)
  assert not np.array_equal(sel_plain, sel_biased)
  np.testing.assert_array_equal(plain.choice, sel_plain)
  np.testing.assert_array_equal(biased.choice, sel_biased)
  for out, sel in ((plain, sel_plain), (biased, sel_biased)):
    top = np.take_along_axis(s, sel, -1)         # unbiased scores
    np.testing.assert_allclose(out.weight, top / top.sum(-1, keepdims=True),
                               rtol=1e-5)
  # D5b: the balance loss sees the normalised sigmoid s / Σ s.
  np.testing.assert_allclose(biased.probs, s / s.sum(-1, keepdims=True),
                             rtol=1e-5)


def test_d5_routed_scaling_factor():
  s = np_sigmoid(DS_Z)
  out, _ = route('deepseek_v3', identity_router(), DS_Z,
                 state={'bias': jnp.zeros(E)}, d_model=E,
                 routed_scaling_factor=2.5)
  top = np.take_along_axis(s, np_topk(s, K), -1)
  np.testing.assert_allclose(out.weight, 2.5 * top / top.sum(-1, keepdims=True),
                             rtol=1e-5)


def test_d6c_weights_gathered_from_each_tokens_own_scores():
  s = np_sigmoid(DS_Z)
  out, _ = route('deepseek_v3', identity_router(), DS_Z,
                 state={'bias': jnp.zeros(E)}, d_model=E)
  idx = np.asarray(out.choice)
  own = np.array([[s[t, idx[t, j]] for j in range(K)] for t in range(6)])
  np.testing.assert_allclose(out.weight, own / own.sum(-1, keepdims=True),
                             rtol=1e-5)
  # LibMoE's wrong-axis gather s[idx[t, j], j] gives other weights here.
  wrong = np.array([[s[idx[t, j], j] for j in range(K)] for t in range(6)])
  assert not np.allclose(wrong / wrong.sum(-1, keepdims=True),
                         own / own.sum(-1, keepdims=True), atol=1e-2)


def test_d6_post_update_moves_bias_by_gamma_sign():
  cfg = make_config('deepseek_v3', num_experts=E, top_k=K, d_model=D,
                    bias_update_rate=0.001)
  bias0 = np.array([0.1, 0.0, 0.0, -0.1], np.float32)
  params = {'w': jnp.zeros((D, E))}
  counts = jnp.asarray([5.0, 1.0, 3.0, 3.0])    # mean 3
  new_params, new_state = ROUTERS['deepseek_v3'].post_update(
      params, {'bias': jnp.asarray(bias0)}, {'expert_counts': counts}, cfg)
  # sign(mean - count) = [-1, +1, 0, 0].
  np.testing.assert_allclose(new_state['bias'],
                             bias0 + 0.001 * np.array([-1.0, 1.0, 0.0, 0.0]),
                             rtol=1e-6)
  assert new_params is params or np.array_equal(new_params['w'], params['w'])


def test_d6_forward_never_changes_router_state():
  x = x_tokens(2, 6)
  block = MoEBlock(d_model=D, num_experts=E, top_k=K, expert_width=F,
                   router='deepseek_v3', backend='loop',
                   router_options={'bias_update_rate': 0.001})
  variables = init_block(block, x)
  bias0 = jnp.asarray([0.3, -0.2, 0.0, 0.1])
  variables = {**variables,
               'router_state': {'router': {'router': {'bias': bias0}}}}
  # Eval without `mutable`: flax would raise if the forward wrote the state.
  y_eval, aux = jax.jit(block.apply)(variables, x)
  # Even a mutable training forward returns the state untouched.
  (y_train, _), state = jax.jit(
      lambda v, x: block.apply(v, x, train=True, mutable=['router_state']))(
          variables, x)
  np.testing.assert_array_equal(state['router_state']['router']['router'][
      'bias'], bias0)
  np.testing.assert_allclose(y_train, y_eval, rtol=1e-6)
  # The counts the train step feeds to post_update are the biased selections.
  rp = variables['params']['router']['router']
  s = np_sigmoid(np.asarray(x).reshape(-1, D) @ np.asarray(rp['w']))
  sel = np_topk(s + np.asarray(bias0), K)
  counts = np.bincount(sel.ravel(), minlength=E)
  np.testing.assert_array_equal(aux['metrics']['expert_counts'], counts)
  cfg = block.router_config()
  _, new_state = ROUTERS['deepseek_v3'].post_update(
      rp, {'bias': bias0}, aux['metrics'], cfg)
  np.testing.assert_allclose(
      new_state['bias'],
      np.asarray(bias0) + 0.001 * np.sign(counts.mean() - counts), rtol=1e-6)


def test_d6b_group_mask_minus_inf_vs_zero_parity():
  # Groups {0, 1} and {2, 3}; the kept group's biased scores are negative.
  z = np.array([[2.0, 1.0, -1.0, -2.0]])
  bias = jnp.full((E,), -2.0)
  opts = dict(n_group=2, topk_group=1, d_model=E)
  out, _ = route('deepseek_v3', identity_router(), z, state={'bias': bias},
                 **opts)
  assert sorted(np.asarray(out.choice)[0].tolist()) == [0, 1]
  hf, _ = route('deepseek_v3', identity_router(), z, state={'bias': bias},
                parity={'group_mask_zero': True}, **opts)
  # Masking with 0 lets the masked group's experts (0 > kept scores) win.
  assert sorted(np.asarray(hf.choice)[0].tolist()) == [2, 3]
  s = np_sigmoid(z)[0]
  np.testing.assert_allclose(np.sort(np.asarray(hf.weight)[0]),
                             np.sort(s[[2, 3]] / s[[2, 3]].sum()), rtol=1e-5)


def test_group_score_is_sum_of_two_largest():
  # Group 0 holds the best single expert (0.9) but group 1 the larger top-2
  # sum (0.6 + 0.55 > 0.9 + 0.1), so group 1 is kept.
  s = np.array([[0.9, 0.1, 0.1, 0.6, 0.55, 0.1]])
  z = np.log(s / (1 - s))
  out, _ = route('deepseek_v3', identity_router(6), z,
                 state={'bias': jnp.zeros(6)}, num_experts=6, d_model=6,
                 n_group=2, topk_group=1)
  np.testing.assert_array_equal(out.choice, [[3, 4]])
  np.testing.assert_allclose(out.weight, [[0.6 / 1.15, 0.55 / 1.15]],
                             rtol=1e-5)


# ------------------------------------------------------------ D7 / D7b TC-MoE

def tc_out(probs, choice):
  probs = jnp.asarray(probs, jnp.float32)
  choice = jnp.asarray(choice, jnp.int32)
  return RouterOutput(expert_index=choice, weight=jnp.ones(choice.shape),
                      choice=choice, probs=probs, logits=probs,
                      balance_eta=jnp.ones(probs.shape[-1]))


def test_d7_tc_balance_does_not_grow_with_batch():
  rng = np.random.default_rng(0)
  # One sequence of 4 tokens, E = 2, 2 null slots (width 6), k = 2.
  probs = rng.dirichlet(np.ones(6), size=4)
  choice = np.array([[0, 2], [0, 4], [1, 0], [3, 5]])
  one = tc_out(probs, choice)
  four = tc_out(np.tile(probs, (4, 1)), np.tile(choice, (4, 1)))
  fixed_1 = losses.tc_balance(one, 1, num_experts=2)
  fixed_4 = losses.tc_balance(four, 4, num_experts=2)
  np.testing.assert_allclose(fixed_4, fixed_1, rtol=1e-6)
  # Hand value: counts e0 <- 0, 2, 0, 0 = 4; e1 <- 1, 3 = 2; nonnull 6.
  pt = probs[:, :4] / probs[:, :4].sum(-1, keepdims=True)
  pair = [(pt[:, 0] + pt[:, 2]).mean(), (pt[:, 1] + pt[:, 3]).mean()]
  np.testing.assert_allclose(fixed_1, 2 * (4 / 6 * pair[0] + 2 / 6 * pair[1]),
                             rtol=1e-5)
  # Parity (global counts, no factor E) grows linearly with the batch.
  parity_1 = losses.tc_balance(one, 1, num_experts=2, global_counts=True)
  parity_4 = losses.tc_balance(four, 4, num_experts=2, global_counts=True)
  np.testing.assert_allclose(parity_4, 4 * parity_1, rtol=1e-5)
  np.testing.assert_allclose(parity_1, 4 / 6 * pair[0] + 2 / 6 * pair[1],
                             rtol=1e-5)


def test_d7b_tc_balance_is_per_expert_and_sign():
  # Both tokens pick expert 0 only: f = [1, 0] (slots 0 and 2, E = 2).
  choice = [[0, 4], [2, 5]]
  mass_on_e0 = [[0.4, 0.1, 0.3, 0.1, 0.05, 0.05]] * 2
  mass_on_e1 = [[0.1, 0.4, 0.1, 0.3, 0.05, 0.05]] * 2
  # L = E Σ_e f_e (P̄⁺_e + P̄⁻_e) = 2 (p̃_0 + p̃_2), p̃ over the 4 non-null slots.
  got0 = losses.tc_balance(tc_out(mass_on_e0, choice), 1, num_experts=2)
  got1 = losses.tc_balance(tc_out(mass_on_e1, choice), 1, num_experts=2)
  np.testing.assert_allclose(got0, 2 * (0.4 + 0.3) / 0.9, rtol=1e-5)
  np.testing.assert_allclose(got1, 2 * (0.1 + 0.1) / 0.9, rtol=1e-5)


# ------------------------------------------------------------------ D8 ReMoE

REMOE_Z = np.array([[1.0, -1.0, -1.0, -1.0],     # 1 active expert
                    [0.5, 0.2, 0.4, -1.0],       # 3 active
                    [-1.0, -1.0, -1.0, -1.0],    # none
                    [0.4, 0.3, 0.2, 0.1]])       # 4 active: overflows 3 slots


def test_d8_remoe_no_topk_variable_active_unnormalised():
  out, _ = route('remoe', identity_router(), REMOE_Z, d_model=E,
                 remoe_max_active=3)
  np.testing.assert_array_equal(
      out.choice, [[0, -1, -1], [0, 2, 1], [-1, -1, -1], [0, 1, 2]])
  np.testing.assert_array_equal(
      out.expert_index, [[0, E, E], [0, 2, 1], [E, E, E], [0, 1, 2]])
  # ReLU values, not renormalised (token 1 sums to 1.1).
  np.testing.assert_allclose(
      out.weight, [[1.0, 0, 0], [0.5, 0.4, 0.2], [0, 0, 0], [0.4, 0.3, 0.2]],
      rtol=1e-6)
  active = (np.asarray(out.choice) >= 0).sum(-1)
  np.testing.assert_array_equal(active, [1, 3, 0, 3])
  # One token of four overflows; it loses 0.1 of the total mass 3.1.
  np.testing.assert_allclose(out.stats['remoe_overflow_frac'], 0.25)
  np.testing.assert_allclose(out.stats['remoe_dropped_mass'], 0.1 / 3.1,
                             rtol=1e-5)
  np.testing.assert_allclose(out.stats['remoe_sparsity'], 1 - 8 / 16)
  # The L1 loss sees the full R, the overflowed 0.1 included: per expert
  # (mass, active) = (1.9, 3), (0.5, 2), (0.6, 2), (0.1, 1); E/(k N²) = 4/32.
  np.testing.assert_allclose(
      losses.remoe_l1(out, 1, top_k=K),
      4 / 32 * (1.9 * 3 + 0.5 * 2 + 0.6 * 2 + 0.1 * 1), rtol=1e-5)


def test_d8_remoe_libmoe_parity_is_fixed_topk():
  out, _ = route('remoe', identity_router(), REMOE_Z, d_model=E,
                 parity={'remoe_libmoe': True})
  assert out.choice.shape == (4, K)
  # Every token runs exactly k experts, even where the ReLU value is 0.
  assert np.all(np.asarray(out.choice) >= 0)
  assert np.all(np.asarray(out.expert_index) < E)
  np.testing.assert_allclose(
      out.weight, [[1.0, 0.0], [0.5, 0.4], [0.0, 0.0], [0.4, 0.3]], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(out.choice)[[0, 1, 3], 0],
                                [0, 0, 0])
  np.testing.assert_array_equal(np.asarray(out.choice)[[1, 3], 1], [2, 1])


# ---------------------------------------------------------------- D9 sigmoid

def test_d9_sigmoid_balance_probs_and_vlm_parity():
  s = np_sigmoid(DS_Z)
  out, _ = route('sigmoid', identity_router(), DS_Z, d_model=E)
  np.testing.assert_allclose(out.probs, s / s.sum(-1, keepdims=True),
                             rtol=1e-5)
  sel = np_topk(s, K)
  top = np.take_along_axis(s, sel, -1)
  np.testing.assert_array_equal(out.choice, sel)
  np.testing.assert_allclose(out.weight, top / top.sum(-1, keepdims=True),
                             rtol=1e-5)
  vlm, _ = route('sigmoid', identity_router(), DS_Z, d_model=E,
                 parity={'vlm_loss_on_softmax': True})
  np.testing.assert_allclose(vlm.probs, np_softmax(DS_Z), rtol=1e-5)
  np.testing.assert_allclose(vlm.weight, out.weight, rtol=1e-6)  # routing same
  raw, _ = route('sigmoid', identity_router(), DS_Z, d_model=E,
                 normalize_topk=False)
  np.testing.assert_allclose(raw.weight, top, rtol=1e-5)


# ----------------------------------------------------------- D10 / D10b cosine

COS_X = np.array([[1.0, 0.0, 0.0, 0.0],
                  [0.6, 0.8, 0.0, 0.0],
                  [0.0, 0.5, 0.5, 0.7]])
COS_W = np.array([[1.0, 0.0, 0.2, 0.0],      # columns are the experts
                  [0.2, 1.0, 0.0, 0.0],
                  [0.0, 0.3, 1.0, 0.1],
                  [0.0, 0.0, 0.3, 0.2]])
COS_B = np.array([0.0, 0.0, 0.0, 0.6])


def cosine_logits(theta=None):
  dots = COS_X @ COS_W
  xn = np.linalg.norm(COS_X, axis=-1, keepdims=True)
  wn = np.linalg.norm(COS_W, axis=0, keepdims=True)
  if theta is None:
    return dots / (xn * wn)
  return dots / ((xn + theta) * (wn + theta))


@pytest.mark.parametrize('name,theta', [('cosine', None),
                                        ('perturbed_cosine', 0.1)])
def test_d10_cosine_bias_on_logits(name, theta):
  tau = 0.2
  logits = cosine_logits(theta) / tau + COS_B
  out, _ = route(name, {'w': COS_W, 'b': COS_B}, COS_X, d_model=E,
                 temperature=tau)
  sel = np_topk(logits, K)
  np.testing.assert_array_equal(out.choice, sel)
  np.testing.assert_allclose(out.weight,
                             np_softmax(np.take_along_axis(logits, sel, -1)),
                             rtol=1e-5)
  np.testing.assert_allclose(out.logits, logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.probs, np_softmax(logits), rtol=1e-5,
                             atol=1e-6)


def test_d10_bias_on_probs_parity():
  tau = 0.2
  cos = cosine_logits()
  p = np_softmax(cos / tau)
  sel_parity = np_topk(p + COS_B, K)
  sel_fixed = np_topk(cos / tau + COS_B, K)
  # The example is chosen so the two selections differ (token 0 picks 3).
  assert not np.array_equal(sel_parity, sel_fixed)
  out, _ = route('cosine', {'w': COS_W, 'b': COS_B}, COS_X, d_model=E,
                 temperature=tau, parity={'bias_on_probs': True})
  np.testing.assert_array_equal(out.choice, sel_parity)
  np.testing.assert_allclose(
      out.weight, np_softmax(np.take_along_axis(p + COS_B, sel_parity, -1)),
      rtol=1e-5)
  np.testing.assert_allclose(out.probs, p, rtol=1e-5, atol=1e-6)


def test_d10b_cosine_init_bias_zero_and_torch_default_parity():
  cfg = make_config('cosine', num_experts=E, top_k=K, d_model=16)
  params, _ = ROUTERS['cosine'].init(jax.random.PRNGKey(0), cfg)
  np.testing.assert_array_equal(params['b'], np.zeros(E))
  assert params['w'].shape == (16, E)
  torch = make_config('cosine', num_experts=E, top_k=K, d_model=16,
                      router_init='torch_default')
  tparams, _ = ROUTERS['cosine'].init(jax.random.PRNGKey(0), torch)
  bound = 1 / np.sqrt(16)
  for name in ('w', 'b'):
    v = np.asarray(tparams[name])
    assert np.all(np.abs(v) <= bound), name
    assert np.all(v != 0), name       # random, not zero
  # U(-0.25, 0.25) has std 0.144; a normal(0.02) init would be far smaller.
  assert np.std(np.asarray(tparams['w'])) > 0.08


# ------------------------------------------------------------- D11 HyperRouter

def hyper_logits(params, state, x, e=E):
  h = np.maximum(np.asarray(params['embedding']) @ np.asarray(
      state['hyper_w1']) + np.asarray(state['hyper_b1']), 0)
  flat = h @ np.asarray(state['hyper_w2']) + np.asarray(state['hyper_b2'])
  wb = flat.reshape(e, -1)
  return np.asarray(x, np.float64) @ wb[:, :-1].T + wb[:, -1]


def test_d11_hyper_router_regenerated_every_forward():
  x = x_tokens(2, 4)
  block = MoEBlock(d_model=D, num_experts=E, top_k=K, expert_width=F,
                   router='hyper', backend='loop',
                   router_options={'hyper_hidden': 4})
  variables = init_block(block, x)
  rp = variables['params']['router']['router']
  state = variables['router_state']['router']['router']
  # Only the embedding trains; the hypernetwork is non-trainable state.
  assert set(rp) == {'embedding'}
  assert {'hyper_w1', 'hyper_b1', 'hyper_w2', 'hyper_b2'} <= set(state)
  apply = jax.jit(block.apply)
  y1, aux1 = apply(variables, x)
  np.testing.assert_allclose(aux1['router_logits'],
                             hyper_logits(rp, state, np.asarray(x).reshape(
                                 -1, D)), rtol=1e-4, atol=1e-6)
  new_embedding = np.asarray(rp['embedding']) + np.linspace(-1, 1, D)
  changed = with_router(variables, embedding=new_embedding)
  y2, aux2 = apply(changed, x)
  np.testing.assert_allclose(
      aux2['router_logits'],
      hyper_logits({'embedding': new_embedding}, state,
                   np.asarray(x).reshape(-1, D)), rtol=1e-4, atol=1e-6)
  assert not np.allclose(aux2['router_logits'], aux1['router_logits'])
  assert not np.allclose(y2, y1)
