"""MoEBlock against the naive per-token reference (tests/moe/naive_moe.py).

For every router of `router.ROUTERS` and every expert backend, on tiny float32
shapes, the block's output and its gradients with respect to x and to every
parameter (router parameters included) must match the naive reference written
from algorithms.md §2-§3. Also covered: the parity flags and options of each
router, capacity mode, edge cases (empty experts, one expert for every token,
K = E, E = 1, all-zero outputs), validation errors that name the field, and
jit / grad / vmap of the block.

Every expected number comes from the naive reference or a hand computation.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe import router as router_lib
from moe_jax.moe.layer import MoEBlock
from tests.moe import naive_moe as naive

B, S, D, F = 2, 6, 16, 8
T = B * S
BACKENDS = ('loop', 'ragged_dot', 'blocked')
# float32 everywhere: levanter's 1e-5 for simple functions (style.md §5).
TOL = dict(atol=1e-5, rtol=1e-5)
# Every routing decision of a test input must clear this gap, so float
# rounding (another CPU, another summation order) cannot flip a selection.
MIN_MARGIN = 1e-4


@dataclasses.dataclass
class Case:
  """One layer configuration, its inputs, and what its routing must exercise."""

  router: str
  num_experts: int = 4
  top_k: int = 2
  # MoEBlock(router_options=...).
  options: dict = dataclasses.field(default_factory=dict)
  # Other MoEBlock fields (activation, expert_bias, shared_*, capacity_factor).
  block: dict = dataclasses.field(default_factory=dict)
  train: bool = False
  step: int = 0
  # Pass random MoE++ gating-residual logits of the previous layer.
  prev_logits: bool = False
  # Values overriding the random router params / router state, by leaf name.
  router_params: dict = dataclasses.field(default_factory=dict)
  router_state: dict = dataclasses.field(default_factory=dict)
  # check(plan, case, variables, x) -> None: asserts the routing covers what
  # the case is about (so the comparison cannot pass vacuously).
  check: Callable[..., None] | None = None
  # False where the router gradient is zero by construction (E = 1, ...).
  router_grad: bool = True
  seed: int = 0

  def module(self, backend: str = 'blocked', **overrides) -> MoEBlock:
    kwargs = dict(d_model=D, num_experts=self.num_experts, top_k=self.top_k,
                  expert_width=F, router=self.router,
                  router_options=self.options, backend=backend, **self.block)
    kwargs.update(overrides)
    return MoEBlock(**kwargs)

  def spec(self, **overrides) -> naive.Spec:
    kwargs = dict(
        router=self.router, num_experts=self.num_experts, top_k=self.top_k,
        activation=self.block.get('activation', 'relu'),
        shared_mix=self.block.get('shared_mix', 'add'),
        capacity_factor=self.block.get('capacity_factor'),
        options=tuple(self.options.items()), train=self.train, step=self.step)
    kwargs.update(overrides)
    return naive.Spec(**kwargs)

  def router_width(self) -> int:
    cfg = router_lib.make_config(self.router, num_experts=self.num_experts,
                                 top_k=self.top_k, d_model=D, **self.options)
    return router_lib.output_width(self.router, cfg)


# ------------------------------------------------------------- inputs ---

def _normal(rng: np.random.Generator, shape, std: float = 1.0):
  # numpy draws: no XLA compilation per shape.
  return jnp.asarray(std * rng.standard_normal(shape), jnp.float32)


def _random_like(tree, rng: np.random.Generator):
  """Every leaf redrawn: N(0, 1/fan_in) for matrices, N(0, 0.3²) for vectors."""
  def draw(leaf):
    shape = tuple(leaf.shape)
    return _normal(rng, shape, 1.0 / np.sqrt(shape[-2]) if len(shape) >= 2
                   else 0.3)
  return jax.tree.map(draw, tree)


# Keyed by repr(case): every field that shapes the inputs is in it.
_INPUTS: dict[str, tuple] = {}


def make_inputs(case: Case):
  """(params, state, x, cotangent, prev_logits) for a case, all float32.

  The parameters are random (not the block's init): every bias nonzero, router
  logits of order 1, so selections are decided by clear margins.
  """
  key = repr(case)
  if key in _INPUTS:
    return _INPUTS[key]
  rng = np.random.default_rng(case.seed)
  x = _normal(rng, (B, S, D))
  ct = _normal(rng, (B, S, D))
  prev = None
  if case.prev_logits:
    prev = _normal(rng, (T, case.router_width()))
  shapes = jax.eval_shape(
      lambda: case.module().init(jax.random.PRNGKey(0), x, prev_logits=prev))
  shapes = nn.meta.unbox(shapes)
  params = _random_like(shapes['params'], rng)
  state = _random_like(shapes.get('router_state', {}), rng)
  for name, value in case.router_params.items():
    assert name in params['router']['router'], name
    params['router']['router'][name] = jnp.asarray(value, jnp.float32)
  for name, value in case.router_state.items():
    assert name in state['router']['router'], name
    state['router']['router'][name] = jnp.asarray(value, jnp.float32)
  _INPUTS[key] = (params, state, x, ct, prev)
  return _INPUTS[key]


# ---------------------------------------------------------- evaluation ---

def _loss_and_grad(block: MoEBlock, train: bool):
  """value_and_grad of <y, ct>: -> (y, dropped_slots), (dparams, dx, dprev)."""
  def loss(params, x, prev, state, ct, step):
    y, aux = block.apply({'params': params, 'router_state': state}, x,
                         train=train, step=step, prev_logits=prev)
    return jnp.sum(y * ct), (y, aux['metrics']['dropped_slots'])

  grad_fn = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)

  def run(params, x, prev, state, ct, step):
    (_, (y, dropped)), grads = grad_fn(params, x, prev, state, ct, step)
    return y, dropped, grads

  return run


def library_fn(block: MoEBlock, train: bool):
  """jit of _loss_and_grad: (params, x, prev, state, ct, step) -> (y, dropped,
  (dparams, dx, dprev))."""
  return jax.jit(_loss_and_grad(block, train))


_LIBRARY_CACHE: dict[tuple, dict] = {}


def library_results(case: Case, backends: tuple[str, ...] = BACKENDS) -> dict:
  """{backend: (y, dropped, grads)} of the jitted block on the case's inputs.

  The backends of one case share one jit (one XLA compilation instead of
  three), and the result is cached across the per-backend test items.
  """
  key = (repr(case), backends)
  if key not in _LIBRARY_CACHE:
    fns = [_loss_and_grad(case.module(b), case.train) for b in backends]

    @jax.jit
    def run(*args):
      return tuple(f(*args) for f in fns)

    params, state, x, ct, prev = make_inputs(case)
    results = run(params, x, prev, state, ct, case.step)
    _LIBRARY_CACHE[key] = dict(zip(backends, results))
  return _LIBRARY_CACHE[key]


def naive_fn(case: Case, spec: naive.Spec | None = None):
  """(y, plan, (dparams, dx, dprev)) of the naive reference."""
  spec = spec or case.spec()
  params, state, x, ct, prev = make_inputs(case)
  plan = naive.naive_plan(params, state, x, spec, prev)

  def loss(params, x, prev):
    y = naive.naive_moe(params, state, x, spec, plan, prev)
    return jnp.sum(y * ct), y

  (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
      params, x, prev)
  return y, plan, grads


_NAIVE_CACHE: dict[str, Any] = {}


def naive_cached(case: Case):
  key = repr(case)
  if key not in _NAIVE_CACHE:
    _NAIVE_CACHE[key] = naive_fn(case)
  return _NAIVE_CACHE[key]


def assert_trees_close(actual, expected, what: str):
  a_paths = jax.tree_util.tree_flatten_with_path(actual)[0]
  e_paths = jax.tree_util.tree_flatten_with_path(expected)[0]
  assert [p for p, _ in a_paths] == [p for p, _ in e_paths], what
  for (path, a), (_, e) in zip(a_paths, e_paths):
    np.testing.assert_allclose(
        np.asarray(a), np.asarray(e), **TOL,
        err_msg=f'{what} {jax.tree_util.keystr(path)}')


def assert_router_grad_nonzero(grads, case: Case):
  """The reference router gradient is not zero, so the router is tested."""
  if not case.router_grad:
    return
  router_grads = grads[0]['router']
  norm = sum(float(jnp.sum(g * g)) for g in jax.tree_util.tree_leaves(
      router_grads))
  assert norm > 1e-6, f'router gradient vanishes in {case}'


def check_case(case: Case, backend: str, *, naive_spec=None,
               all_backends: bool = False):
  """The block on `backend` against the naive reference: y and every grad.

  all_backends: compile the case for every backend at once (the other
  backends' test items then reuse the cached results).
  """
  params, state, x, ct, prev = make_inputs(case)
  if naive_spec is None:
    y_ref, plan, g_ref = naive_cached(case)
  else:
    y_ref, plan, g_ref = naive_fn(case, naive_spec)
  assert plan.margin > MIN_MARGIN, f'near-tie in the routing: {plan.margin}'
  if case.check is not None:
    case.check(plan, case, (params, state), x)
  assert_router_grad_nonzero(g_ref, case)
  backends = BACKENDS if all_backends else (backend,)
  y, dropped, grads = library_results(case, backends)[backend]
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), **TOL,
                             err_msg='output')
  assert_trees_close(grads[0], g_ref[0], 'd params')
  np.testing.assert_allclose(np.asarray(grads[1]), np.asarray(g_ref[1]),
                             **TOL, err_msg='d x')
  if prev is not None:
    np.testing.assert_allclose(np.asarray(grads[2]), np.asarray(g_ref[2]),
                               **TOL, err_msg='d prev_logits')
  return plan, dropped


# ------------------------------------------------------- coverage checks ---

def _all_selected(plan):
  return [i for sel in plan.selected for i in sel]


def _check_slot_kinds(*kinds):
  """MoE++ / TC-MoE: every listed kind of slot is selected somewhere."""
  def check(plan, case, variables, x):
    spec = case.spec()
    seen = set()
    for i in _all_selected(plan):
      if case.router == 'moe_plus_plus':
        seen.add(naive.moepp_kind(spec, i)[0])
      else:
        e = case.num_experts
        seen.add('pos' if i < e else 'neg' if i < 2 * e else 'null')
    assert set(kinds) <= seen, (kinds, seen)
    if case.router == 'moe_plus_plus' and 'zero' in kinds:
      # A token with a zero slot next to a non-zero one: the renorm matters.
      assert any(
          len({naive.moepp_kind(spec, i)[0] == 'zero' for i in sel}) == 2
          for sel in plan.selected)
  return check


def _check_fewer_slots(n_max: int, *, overflow: bool = False):
  """ReMoE / HyperRouter: tokens with fewer active slots than the layout."""
  def check(plan, case, variables, x):
    counts = [len(sel) for sel in plan.selected]
    assert min(counts) < n_max, counts
    if overflow:
      params, _ = variables
      z = np.asarray(x).reshape(T, D) @ np.asarray(
          params['router']['router']['w'])
      assert np.any(np.sum(z > 0, axis=-1) > n_max), 'no token overflows'
  return check


def _check_differs(**spec_overrides):
  """The decisions differ from those of the spec with these overrides, so
  the option under test changes the routing."""
  def check(plan, case, variables, x):
    params, state = variables
    other = naive.naive_plan(params, state, x, case.spec(**spec_overrides))
    assert plan.selected != other.selected, spec_overrides
  return check


def _check_uses(used: set[int], unused: set[int] = frozenset()):
  def check(plan, case, variables, x):
    seen = set(_all_selected(plan))
    assert used <= seen and not (unused & seen), (seen, used, unused)
  return check


# --------------------------------------------------------------- cases ---

_MOEPP = dict(n_const=2, n_copy=1, n_zero=1)
# DeepSeek-V3 selection biases (router_state); each changes some selection.
_DS_BIAS = [0.3, -0.2, 0.25, -0.1]
_DS_GROUP_BIAS = [0.2, -0.3, 0.1, -0.1, 0.3, -0.2]
# E = 6 in 2 groups of 3: the kept group's negative biased scores let a
# 0-masked expert of the other group win under `group_mask_zero` (D6b).
_DS_ZERO_BIAS = [0.5, -2.0, -2.0, 0.5, -2.0, -2.0]

# One case per router; these run on every backend.
ROUTER_CASES = {
    'smoe': Case('smoe'),
    'sigmoid': Case('sigmoid'),
    # Default τ = 0.3 (algorithms.md §3.3) comes from the reference.
    'xmoe': Case('xmoe'),
    # Default τ = 0.2 (§3.4), random nonzero bias b.
    'cosine': Case('cosine'),
    'perturbed_cosine': Case('perturbed_cosine'),
    'hyper': Case('hyper', top_k=3),
    'deepseek_v2': Case('deepseek_v2', num_experts=5,
                        block=dict(shared_experts=2, shared_width=4)),
    'deepseek_v3': Case('deepseek_v3', block=dict(shared_experts=1),
                        router_state=dict(bias=_DS_BIAS),
                        check=_check_differs(options=(('n_group', 1),),
                                             router='sigmoid')),
    'moe_plus_plus': Case('moe_plus_plus', options=_MOEPP, prev_logits=True,
                          check=_check_slot_kinds('ffn', 'const', 'copy',
                                                  'zero')),
    'tc_moe': Case('tc_moe', check=_check_slot_kinds('pos', 'neg')),
    'remoe': Case('remoe', num_experts=5, check=_check_fewer_slots(4)),
}

# Options, parity flags and activations.
VARIANT_CASES = {
    'xmoe_double_softmax': Case(
        'xmoe', num_experts=5,
        options=dict(temperature=0.5, xmoe_dim=3,
                     parity={'xmoe_double_softmax': True})),
    'cosine_bias_on_probs': Case(
        'cosine', options=dict(temperature=1.0, router_init='torch_default',
                               parity={'bias_on_probs': True})),
    'perturbed_cosine_bias_on_probs': Case(
        'perturbed_cosine', num_experts=5,
        options=dict(temperature=0.5, cosine_theta=0.3,
                     parity={'bias_on_probs': True})),
    # k_t = round((3 - 1) * 2 / 4) + 1 = 2 < k_max = 3.
    'hyper_schedule': Case(
        'hyper', top_k=3, train=True, step=2,
        options=dict(hyper_k_min=1, total_steps=4, hyper_hidden=6),
        check=_check_fewer_slots(3)),
    'deepseek_v3_groups_shared_half': Case(
        'deepseek_v3', num_experts=6,
        options=dict(n_group=2, topk_group=1, routed_scaling_factor=2.5),
        block=dict(shared_experts=1, shared_mix='half'),
        router_state=dict(bias=_DS_GROUP_BIAS),
        check=_check_differs(options=(('n_group', 1),))),
    'deepseek_v3_groups_mask_zero': Case(
        'deepseek_v3', num_experts=6,
        options=dict(n_group=2, topk_group=1,
                     parity={'group_mask_zero': True}),
        router_state=dict(bias=_DS_ZERO_BIAS),
        check=_check_differs(options=(('n_group', 2), ('topk_group', 1)))),
    'moe_plus_plus_keep': Case(
        'moe_plus_plus', options=dict(_MOEPP, zero_weight_mode='keep',
                                      gate_residual=False),
        prev_logits=True, check=_check_slot_kinds('zero')),
    'moe_plus_plus_mul_topk': Case(
        'moe_plus_plus', options=dict(_MOEPP, parity={'moepp_mul_topk': True}),
        prev_logits=True, seed=1,
        check=_check_slot_kinds('ffn', 'const', 'copy')),
    # First MoE layer (no incoming residual), 2-layer router.
    'moe_plus_plus_depth2': Case(
        'moe_plus_plus', top_k=3,
        options=dict(n_const=2, n_copy=2, n_zero=1, router_depth=2),
        check=_check_slot_kinds('ffn', 'const', 'copy', 'zero')),
    'remoe_max_active_all': Case('remoe', num_experts=5,
                                 options=dict(remoe_max_active=5),
                                 check=_check_fewer_slots(5)),
    'remoe_overflow': Case('remoe', num_experts=5,
                           options=dict(remoe_max_active=2),
                           check=_check_fewer_slots(2, overflow=True)),
    'remoe_libmoe': Case('remoe', num_experts=5,
                         options=dict(parity={'remoe_libmoe': True})),
    # The activation cases also carry router options: each option is
    # independent of the activation.
    'swiglu_bias_shared': Case(
        'smoe', num_experts=5, options=dict(normalize_topk=False),
        block=dict(activation='swiglu', expert_bias=True, shared_experts=1)),
    'gelu_tanh_bias': Case(
        'sigmoid', options=dict(normalize_topk=False),
        block=dict(activation='gelu_tanh', expert_bias=True)),
    # TC-MoE with selected null slots: the sentinel reaches every backend.
    'gelu_bias_tc_null_slots': Case(
        'tc_moe', options=dict(num_null=3, tc_neg_offset=-0.5,
                               tc_null_offset=0.5),
        block=dict(activation='gelu', expert_bias=True), seed=1,
        check=_check_slot_kinds('pos', 'neg', 'null')),
}


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('name', sorted(ROUTER_CASES))
def test_router_parity(name, backend):
  check_case(ROUTER_CASES[name], backend, all_backends=True)


def test_every_router_is_covered():
  assert set(ROUTER_CASES) == set(router_lib.ROUTERS)


# Routing options live in the router, which no backend sees: the default
# backend suffices. Expert activations and biases reach the grouped FFN, so
# those run on every backend.
_ACTIVATION_CASES = ('gelu_bias_tc_null_slots', 'gelu_tanh_bias',
                     'swiglu_bias_shared')


@pytest.mark.parametrize('name', sorted(set(VARIANT_CASES)
                                        - set(_ACTIVATION_CASES)))
def test_variant_parity(name):
  check_case(VARIANT_CASES[name], 'blocked')


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('name', _ACTIVATION_CASES)
def test_activation_parity(name, backend):
  check_case(VARIANT_CASES[name], backend, all_backends=True)


# ------------------------------------------------------------- capacity ---

_BIG = dict(capacity_factor=100.0)
CAPACITY_CASES = {
    'hyper_schedule': Case('hyper', top_k=3, train=True, step=2,
                           options=dict(total_steps=4), block=_BIG),
    'moe_plus_plus': Case('moe_plus_plus', options=_MOEPP, prev_logits=True,
                          block=_BIG),
    'tc_moe': Case('tc_moe', options=dict(tc_null_offset=0.5), block=_BIG),
    'remoe': Case('remoe', num_experts=5, block=_BIG),
}


@pytest.mark.parametrize('name', sorted(CAPACITY_CASES))
def test_capacity_without_drops_equals_dropless(name):
  case = CAPACITY_CASES[name]
  # The expected values are the naive DROPLESS layer.
  _, dropped = check_case(case, 'blocked',
                          naive_spec=case.spec(capacity_factor=None))
  assert int(dropped) == 0


def test_capacity_drops_follow_slot_major_priority():
  # C = ceil(0.5 * 12 * 2 / 4) = 3 rows per expert: slots overflow.
  case = Case('smoe', block=dict(capacity_factor=0.5))
  plan, dropped = check_case(case, 'blocked')
  assert len(plan.dropped) > 0
  assert int(dropped) == len(plan.dropped)


# ----------------------------------------------------------- edge cases ---

_TORCH = dict(router_init='torch_default')   # gives the router a bias b
EDGE_CASES = {
    # Experts 1 and 4 receive no token (one in the middle, the last one).
    'empty_experts': Case('smoe', num_experts=5, options=_TORCH,
                          router_params=dict(b=[0.1, -30, 0.0, -0.1, -30]),
                          check=_check_uses({0, 2, 3}, {1, 4})),
    # Every token goes to expert 2 only.
    'one_expert_k1': Case('smoe', top_k=1, options=_TORCH,
                          router_params=dict(b=[0.0, 0.0, 30.0, 0.0]),
                          check=_check_uses({2}, {0, 1, 3}),
                          router_grad=False),
    # Every token has expert 2 in its first slot.
    'one_expert_k2': Case('sigmoid', options=_TORCH,
                          router_params=dict(b=[0.0, 0.0, 30.0, 0.0]),
                          check=lambda plan, *a: (
                              None if all(sel[0] == 2 for sel in plan.selected)
                              else pytest.fail('expert 2 not first'))),
    'k_equals_e': Case('smoe', num_experts=4, top_k=4),
    'tc_moe_k_equals_2e': Case('tc_moe', num_experts=2, top_k=4,
                              options=dict(num_null=1, tc_null_offset=0.0)),
    'single_expert_smoe': Case('smoe', num_experts=1, top_k=1,
                               router_grad=False),
    'single_expert_deepseek_v3': Case('deepseek_v3', num_experts=1, top_k=1,
                                      block=dict(shared_experts=1),
                                      router_grad=False),
    'single_expert_remoe': Case('remoe', num_experts=1, top_k=1),
    'single_expert_tc_moe': Case('tc_moe', num_experts=1, top_k=1,
                                 options=dict(num_null=1)),
}


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('name', ['empty_experts', 'one_expert_k1',
                                  'k_equals_e', 'single_expert_smoe'])
def test_edge_case_every_backend(name, backend):
  check_case(EDGE_CASES[name], backend, all_backends=True)


@pytest.mark.parametrize('name', ['one_expert_k2', 'tc_moe_k_equals_2e',
                                  'single_expert_deepseek_v3',
                                  'single_expert_remoe',
                                  'single_expert_tc_moe'])
def test_edge_case(name):
  check_case(EDGE_CASES[name], 'blocked')


def test_empty_expert_gets_zero_gradient():
  # Hand fact: an expert no token chose has zero gradient.
  _, _, grads = library_results(EDGE_CASES['empty_experts'])['blocked']
  for name in ('w_in', 'w_out'):
    g = np.asarray(grads[0]['experts'][name])
    assert np.all(g[[1, 4]] == 0) and np.any(g[[0, 2, 3]] != 0)


def test_all_zero_experts_give_zero_output():
  # MoE++ with n_zero = k = 2 and both zero experts far ahead: every token
  # selects only zero experts, so y = 0 (hand computation, §3.9) and nothing
  # reaches the FFN experts.
  case = Case('moe_plus_plus', options=dict(n_const=1, n_copy=1, n_zero=2,
                                            gate_residual=False, **_TORCH),
              router_params=dict(b=[0.0] * 6 + [30.0, 30.0]),
              router_grad=False)
  params, state, x, ct, prev = make_inputs(case)
  y, _, grads = library_fn(case.module('blocked'), False)(
      params, x, prev, state, ct, 0)
  np.testing.assert_array_equal(np.asarray(y), 0.0)
  np.testing.assert_array_equal(np.asarray(grads[1]), 0.0)
  for g in jax.tree_util.tree_leaves(grads[0]):
    np.testing.assert_array_equal(np.asarray(g), 0.0)
  y_ref, plan, _ = naive_fn(case)
  assert all(i >= 6 for i in _all_selected(plan))
  np.testing.assert_array_equal(np.asarray(y_ref), 0.0)


def test_remoe_no_active_expert_gives_zero_output():
  # ReLU(z) = 0 for every expert (bias -30): y = 0 by hand (§3.11).
  case = Case('remoe', options=_TORCH, router_params=dict(b=[-30.0] * 4),
              router_grad=False)
  params, state, x, ct, prev = make_inputs(case)
  y, _, grads = library_fn(case.module('blocked'), False)(
      params, x, prev, state, ct, 0)
  np.testing.assert_array_equal(np.asarray(y), 0.0)
  for g in jax.tree_util.tree_leaves(grads):
    np.testing.assert_array_equal(np.asarray(g), 0.0)


def test_single_expert_is_the_dense_mlp():
  # E = k = 1 with a softmax router: g = 1, so y = relu(x W_in) W_out by hand.
  case = EDGE_CASES['single_expert_smoe']
  params, _, x, _, _ = make_inputs(case)
  y, _, _ = library_results(case)['blocked']
  w_in = np.asarray(params['experts']['w_in'][0], np.float64)
  w_out = np.asarray(params['experts']['w_out'][0], np.float64)
  expected = np.maximum(np.asarray(x, np.float64) @ w_in, 0.0) @ w_out
  np.testing.assert_allclose(np.asarray(y), expected, **TOL)


# ----------------------------------------------------------- validation ---

INVALID = [
    (dict(top_k=5), 'top_k'),
    (dict(top_k=0), 'top_k'),
    (dict(router='remoe', top_k=5), 'top_k'),
    (dict(router='no_such_router'), 'router'),
    (dict(backend='no_such_backend'), 'backend'),
    (dict(router_options=dict(init_std=-0.1)), 'init_std'),
    (dict(router='moe_plus_plus', router_options=dict(hetero_tau=-0.5)),
     'hetero_tau'),
    (dict(router='deepseek_v3', router_options=dict(bias_update_rate=-1e-3)),
     'bias_update_rate'),
    (dict(router_options=dict(parity={'no_such_flag': True})), 'parity'),
    (dict(router_options=dict(no_such_field=1)), 'router options'),
    (dict(activation='tanh'), 'activation'),
    (dict(capacity_factor=0.0), 'capacity_factor'),
    (dict(capacity_factor=-1.0), 'capacity_factor'),
    (dict(w_in_std=-0.02), 'w_in_std'),
    (dict(shared_w_out_std=-0.02, shared_experts=1), 'shared_w_out_std'),
    (dict(expert_width=0), 'expert_width'),
    (dict(shared_mix='mean', shared_experts=1), 'shared_mix'),
    (dict(router='cosine', router_options=dict(temperature=0.0)),
     'temperature'),
    (dict(router='perturbed_cosine', router_options=dict(cosine_theta=-0.1)),
     'cosine_theta'),
    (dict(router_options=dict(expert_dropout=1.0)), 'expert_dropout'),
    (dict(router='hyper', router_options=dict(hyper_k_min=3)), 'hyper_k_min'),
    (dict(router='deepseek_v3', router_options=dict(n_group=3)), 'n_group'),
    (dict(router='deepseek_v3', router_options=dict(n_group=2, topk_group=3)),
     'topk_group'),
    (dict(router='moe_plus_plus', router_options=dict(zero_weight_mode='x')),
     'zero_weight_mode'),
    (dict(router='moe_plus_plus', router_options=dict(router_depth=3)),
     'router_depth'),
    (dict(router='tc_moe', router_options=dict(num_null=-1)), 'num_null'),
    (dict(router='remoe', router_options=dict(remoe_max_active=5)),
     'remoe_max_active'),
    (dict(losses=('no_such_loss',)), 'losses'),
    (dict(balance_count_mode='top2'), 'balance_count_mode'),
]


@pytest.mark.parametrize('kwargs,field', INVALID,
                         ids=[f'{f}-{i}' for i, (_, f) in enumerate(INVALID)])
def test_invalid_setting_names_the_field(kwargs, field):
  base = dict(d_model=D, num_experts=4, top_k=2, expert_width=F)
  base.update(kwargs)
  x = jnp.zeros((1, 2, D), jnp.float32)
  with pytest.raises(ValueError, match=rf'^{re.escape(field)}:'):
    jax.eval_shape(lambda: MoEBlock(**base).init(jax.random.PRNGKey(0), x))


# ------------------------------------------------------ jit, grad, vmap ---

# Cases of the parity tests, so the first vmapped input reuses their cached
# naive results.
VMAP_CASES = {
    'smoe': ROUTER_CASES['smoe'],
    'hyper': VARIANT_CASES['hyper_schedule'],
    'remoe': ROUTER_CASES['remoe'],
    'tc_moe': VARIANT_CASES['gelu_bias_tc_null_slots'],
}


@pytest.mark.parametrize('name', sorted(VMAP_CASES))
def test_vmap_jit_grad(name):
  """jit(vmap(value_and_grad)) over 3 independent [B, S, D] inputs equals the
  naive reference on each input, for the output and d/dx, d/dparams."""
  case = VMAP_CASES[name]
  block = case.module('blocked')
  params, state, x0, ct0, _ = make_inputs(case)
  rng = np.random.default_rng(7)
  xs = jnp.concatenate([x0[None], _normal(rng, (2, B, S, D))])
  cts = jnp.concatenate([ct0[None], _normal(rng, (2, B, S, D))])

  def loss(params, x, ct, step):
    y, _ = block.apply({'params': params, 'router_state': state}, x,
                       train=case.train, step=step)
    return jnp.sum(y * ct), y

  grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  batched = jax.jit(jax.vmap(grad_fn, in_axes=(None, 0, 0, None)))
  (_, ys), (dparams, dxs) = batched(params, xs, cts, case.step)
  spec = case.spec()
  for i in range(3):
    if i == 0:
      y_ref, plan, g_ref = naive_cached(case)
    else:
      plan = naive.naive_plan(params, state, xs[i], spec)
      (_, y_ref), g_ref = jax.value_and_grad(
          lambda p, x: (lambda y: (jnp.sum(y * cts[i]), y))(
              naive.naive_moe(p, state, x, spec, plan)),
          argnums=(0, 1), has_aux=True)(params, xs[i])
    assert plan.margin > MIN_MARGIN, plan.margin
    np.testing.assert_allclose(np.asarray(ys[i]), np.asarray(y_ref), **TOL,
                               err_msg=f'input {i} y')
    assert_trees_close(jax.tree.map(lambda g: g[i], dparams), g_ref[0],
                       f'input {i} d params')
    np.testing.assert_allclose(np.asarray(dxs[i]), np.asarray(g_ref[1]),
                               **TOL, err_msg=f'input {i} d x')
  # The three inputs route differently, so the batch is not one input thrice.
  assert not np.allclose(np.asarray(ys[0]), np.asarray(ys[1]))
