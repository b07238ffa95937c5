"""Sparse upcycling of imported tiny Llama and Qwen2 models.

Routers whose weights sum to 1 over identical experts compute the dense
model's function at step 0 (algorithms.md §10.1): their logits must equal
the dense model's to 1e-5. MoE++ does not (its zero / constant slots), which
the last test shows rather than assumes.
"""

import numpy as np
import pytest

pytest.importorskip('torch')
pytest.importorskip('transformers')

from moe_jax.convert import hf_import  # pylint: disable=g-import-not-at-top
from moe_jax.convert import upcycle  # pylint: disable=g-import-not-at-top
from tests.convert import test_hf_import as hf_cases  # pylint: disable=g-import-not-at-top
from tests.convert.logits import jax_logits  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope='module')
def dense_models(tmp_path_factory):
  root = tmp_path_factory.mktemp('dense')
  out = {}
  for family in ('llama', 'qwen2_tied'):
    _, directory = hf_cases.build_hf(family, root)
    out[family] = hf_import.import_hf(str(directory), progress=False)
  return out


PRESERVING = [
    ('smoe', {}, 0),
    ('sigmoid', {'normalize_topk': True}, 0),
    ('deepseek_v2', {}, 1),          # shared expert, mixed 0.5 / 0.5
    ('xmoe', {}, 0),
    ('cosine', {}, 0),
    ('deepseek_v3', {'bias_update_rate': 0.001}, 1),
]


@pytest.mark.parametrize('family', ['llama', 'qwen2_tied'])
@pytest.mark.parametrize('router,options,shared', PRESERVING,
                         ids=[r for r, _, _ in PRESERVING])
def test_upcycled_model_computes_the_dense_function(dense_models, family,
                                                     router, options, shared):
  _, params, kwargs = dense_models[family]
  want = jax_logits(kwargs, params)
  moe_kwargs, moe_params, state = upcycle.upcycle(
      kwargs, params, router=router, num_experts=4, top_k=2,
      shared_experts=shared, router_options=options, backend='loop')
  got = jax_logits(moe_kwargs, moe_params, state)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # Every expert is the dense MLP; the router is the registry's, std 0.02.
  experts = moe_params['layer_1']['moe']['experts']['w_in']
  np.testing.assert_array_equal(
      experts[3], params['layer_1']['ffn']['ffn']['w_in'])


def test_noise_and_fine_grained_segments(dense_models):
  _, params, kwargs = dense_models['llama']
  dense_in = np.asarray(params['layer_0']['ffn']['ffn']['w_in'])
  dense_out = np.asarray(params['layer_0']['ffn']['ffn']['w_out'])
  _, moe_params, _ = upcycle.upcycle(kwargs, params, router='smoe',
                                     num_experts=4, top_k=2, granularity=2)
  w_in = moe_params['layer_0']['moe']['experts']['w_in']      # [E, D, 2F]
  w_out = moe_params['layer_0']['moe']['experts']['w_out']    # [E, F, D]
  width = dense_out.shape[0]
  # Expert 1 is the second half of the hidden units: gate and up columns.
  np.testing.assert_array_equal(w_in[1][:, :width // 2],
                                dense_in[:, width // 2:width])
  np.testing.assert_array_equal(w_in[1][:, width // 2:],
                                dense_in[:, width + width // 2:])
  np.testing.assert_array_equal(w_out[3], dense_out[width // 2:])
  # The segments add up to the dense MLP: SwiGLU is per hidden unit.
  x = np.random.default_rng(0).normal(size=(5, dense_in.shape[0]))
  def mlp(a, b):
    h = x @ a
    g, u = np.split(h, 2, axis=-1)
    return (g / (1 + np.exp(-g)) * u) @ b
  np.testing.assert_allclose(mlp(w_in[0], w_out[0]) + mlp(w_in[1], w_out[1]),
                             mlp(dense_in, dense_out), atol=1e-5)
  _, noisy, _ = upcycle.upcycle(kwargs, params, router='smoe', num_experts=4,
                                top_k=2, noise=0.01, seed=1)
  noisy_in = noisy['layer_0']['moe']['experts']['w_in']
  assert not np.array_equal(noisy_in[0], noisy_in[1])
  rel = np.std(noisy_in[0] - dense_in) / np.std(dense_in)
  assert 0.005 < rel < 0.02


def test_libmoe_router_seed_gives_every_layer_the_same_router(dense_models):
  _, params, kwargs = dense_models['llama']
  _, same, _ = upcycle.upcycle(kwargs, params, router='smoe', num_experts=4,
                               top_k=2, router_seed='libmoe')
  _, distinct, _ = upcycle.upcycle(kwargs, params, router='smoe',
                                   num_experts=4, top_k=2)
  router = lambda p, l: p[f'layer_{l}']['moe']['router']['router']['w']
  np.testing.assert_array_equal(router(same, 0), router(same, 1))
  assert not np.array_equal(router(distinct, 0), router(distinct, 1))
  assert abs(float(np.std(router(distinct, 0))) - 0.02) < 0.004


def test_moe_plus_plus_is_not_function_preserving(dense_models):
  _, params, kwargs = dense_models['llama']
  want = jax_logits(kwargs, params)
  moe_kwargs, moe_params, state = upcycle.upcycle(
      kwargs, params, router='moe_plus_plus', num_experts=4, top_k=2,
      router_options={'n_zero': 1, 'n_copy': 1, 'n_const': 2})
  got = jax_logits(moe_kwargs, moe_params, state)
  assert np.abs(got - want).max() > 1e-3


def test_upcycling_needs_a_swiglu_dense_model(dense_models):
  _, params, kwargs = dense_models['llama']
  bad = dict(kwargs, ffn=dict(kwargs['ffn'], activation='relu'))
  with pytest.raises(ValueError, match='activation: expected a SwiGLU'):
    upcycle.upcycle(bad, params, router='smoe', num_experts=4, top_k=2)
  with pytest.raises(ValueError, match='granularity'):
    upcycle.upcycle(kwargs, params, router='smoe', num_experts=4, top_k=2,
                    granularity=3)
