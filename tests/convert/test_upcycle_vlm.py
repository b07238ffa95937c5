"""Sparse upcycling of a tiny LLaVA's vision-tower MLPs and projector.

Routers whose weights sum to 1 over identical experts compute the dense
model's function at step 0 (algorithms.md §10.1): the upcycled model's
logits must equal the dense model's to 1e-5 for smoe, sigmoid
(renormalised: normalize_topk, the default) and deepseek_v2 (one shared
expert mixed 0.5 / 0.5). MoE++ does not (its zero / copy / constant slots),
which the last test shows rather than assumes. The dense model is a random
tiny Llava (SigLIP-style tower with GELU-tanh MLPs, S² scales 1 and 2, a
Phi-3-style LLM) with random biases and norms, so a bias left out of the
copy would show.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.convert import upcycle_vlm
from moe_jax.models import llava

L_TOWER, N_IMG, S = 2, 16, 24
TOWER = dict(kind='siglip', image_size=16, patch_size=4, d_model=16,
             num_layers=L_TOWER, num_heads=2, mlp_width=24,
             activation='gelu_tanh', norm_eps=1e-6)
# The projector maps D_v·s = 16·2 = 32 -> 40 -> 40: d_out != d_model.
LLM = dict(vocab_size=64, d_model=40, num_layers=1, num_heads=4, head_dim=10,
           num_kv_heads=2, dense_ffn=True,
           ffn=dict(d_model=40, width=48, activation='swiglu',
                    use_bias=False),
           norm='rmsnorm', norm_eps=1e-5, kv_projection='separate',
           rope_fraction=1.0, output_bias=False)
IMAGE_TOKEN = 5
MOE = dict(num_experts=4, top_k=2, backend='loop', balance_count_mode='top1',
           balance_group='sequence', losses=('balance', 'z_loss'))


def _inputs():
  rng = np.random.default_rng(0)
  tokens = rng.integers(6, 64, (2, S))
  tokens[0, 2:2 + N_IMG] = IMAGE_TOKEN
  tokens[1, 5:5 + N_IMG] = IMAGE_TOKEN
  images = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  return jnp.asarray(tokens, jnp.int32), jnp.asarray(images)


@pytest.fixture(scope='module')
def dense():
  model = llava.Llava(tower=TOWER, llm=LLM, projector_width=40,
                      image_token_id=IMAGE_TOKEN, s2_scales=(1, 2))
  tokens, images = _inputs()
  params = nn.unbox(model.init(jax.random.key(0), tokens, images))['params']
  rng = np.random.default_rng(1)

  def perturb(path, a):
    name = jax.tree_util.keystr(path)
    if name.endswith("['bias']") or "['b_" in name:
      return jnp.asarray(rng.normal(0, 0.1, a.shape), jnp.float32)
    if name.endswith("['scale']"):
      return jnp.asarray(1 + rng.normal(0, 0.1, a.shape), jnp.float32)
    return a

  params = jax.tree_util.tree_map_with_path(perturb, params)
  logits, _ = jax.jit(model.apply)({'params': params}, tokens, images)
  return model, params, np.asarray(logits)


def _upcycled_logits(model, params, router, options, shared, sites):
  moe = dict(MOE, router=router, router_options=options,
             shared_experts=shared, shared_mix='half')
  if shared:
    moe.update(num_experts=3, top_k=1)          # DeepSeek: one expert shared
  target = model.clone(tower_ffn='moe' if 'tower' in sites else 'dense',
                       projector_ffn=('moe' if 'projector' in sites
                                      else 'dense'), moe=moe)
  params, state = upcycle_vlm.upcycle_llava(target, params, sites=sites)
  variables = {'params': params}
  if state:
    variables['router_state'] = state
  tokens, images = _inputs()
  logits, auxes = jax.jit(target.apply)(variables, tokens, images)
  return target, params, np.asarray(logits), auxes


PRESERVING = [('smoe', {}, 0), ('sigmoid', {'normalize_topk': True}, 0),
              ('deepseek_v2', {}, 1)]


@pytest.mark.parametrize('router,options,shared', PRESERVING,
                         ids=[r for r, _, _ in PRESERVING])
def test_upcycled_tower_and_projector_compute_the_dense_function(
    dense, router, options, shared):
  model, params, want = dense
  target, moe_params, got, auxes = _upcycled_logits(
      model, params, router, options, shared, ('tower', 'projector'))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # One aux per tower layer and S² scale, then the projector's.
  assert len(auxes) == 2 * L_TOWER + 1 == len(target.router_paths())
  assert target.aux_groups() == ((0, 2 * L_TOWER), (2 * L_TOWER,
                                                    2 * L_TOWER + 1))
  # Every expert is the dense MLP, biases included.
  dense_ffn = params['vision']['layer_1']['ffn']['ffn']
  experts = moe_params['vision']['layer_1']['moe']['experts']
  for name in ('w_in', 'b_in', 'w_out', 'b_out'):
    np.testing.assert_array_equal(experts[name][-1], dense_ffn[name])
  projector = moe_params['projector']['moe']['experts']
  assert projector['w_in'].shape == (target.moe['num_experts'], 32, 40)
  assert projector['w_out'].shape == (target.moe['num_experts'], 40, 40)
  np.testing.assert_array_equal(
      projector['b_out'][0], params['projector']['ffn']['ffn']['b_out'])
  # LibMoE's seed 42 in every layer: the tower's routers start identical.
  r0 = moe_params['vision']['layer_0']['moe']['router']['router']
  r1 = moe_params['vision']['layer_1']['moe']['router']['router']
  jax.tree.map(np.testing.assert_array_equal, r0, r1)
  assert 0.01 < float(np.std(r0['w'])) < 0.04
  if shared:
    assert 'shared' in moe_params['projector']['moe']


def test_moe_plus_plus_does_not_preserve_the_dense_function(dense):
  model, params, want = dense
  _, _, got, _ = _upcycled_logits(model, params, 'moe_plus_plus', {}, 0,
                                  ('tower',))
  assert np.abs(got - want).max() > 1e-3


def test_moe_plus_plus_projector_needs_d_out_equal_d_model(dense):
  model, params, _ = dense
  with pytest.raises(ValueError, match='d_out'):
    _upcycled_logits(model, params, 'moe_plus_plus', {}, 0, ('projector',))


def test_sites_must_be_moe_in_the_target(dense):
  model, params, _ = dense
  with pytest.raises(ValueError, match='projector_ffn'):
    upcycle_vlm.upcycle_llava(model.clone(tower_ffn='moe', moe=dict(
        MOE, router='smoe')), params, sites=('tower', 'projector'))
