"""Exporting MoE models to Qwen3-MoE, OLMoE and Glm4Moe (and back).

Round trip: each MoE family's tiny random HF model (test_hf_import_moe.py)
is imported, exported to its own class, and the safetensors keys, shapes
and values equal the original save_pretrained's (per-expert layout); the
export re-imports to the same TransformerLM kwargs and from_pretrained
logits equal moe_jax's to 1e-4. Upcycled tiny dense models export too:
smoe -> Qwen3-MoE (per-head q/k norm) and OLMoE (full-width q/k norm, a
dense model built in JAX since no dense HF family has it), deepseek_v3 /
sigmoid with and without shared experts -> Glm4Moe; transformers computes
the same logits. Routers a class cannot hold are refused with the classes
that can.
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

# pylint: disable=g-import-not-at-top
from moe_jax.convert import hf_export
from moe_jax.convert import hf_import
from moe_jax.convert import moe_families
from moe_jax.convert import safetensors_io
from moe_jax.convert import upcycle
from moe_jax.models import decoder
from tests.convert import logits
from tests.convert import test_hf_import as dense_cases
from tests.convert import test_hf_import_moe as moe_cases
# pylint: enable=g-import-not-at-top

ARCHITECTURES = {family: arch for arch, family in
                 moe_families.ARCHITECTURES.items()}


def check_logits(out_dir, kwargs, params, router_state=None):
  np.testing.assert_allclose(
      logits.torch_logits(logits.load_hf(out_dir)),
      logits.jax_logits(kwargs, params, router_state), atol=1e-4,
      rtol=1e-4)


@pytest.mark.parametrize('name', ['mixtral', 'qwen2_moe', 'qwen3_moe',
                                  'olmoe', 'glm4_moe',
                                  'glm4_moe_unnormalised'])
def test_moe_round_trip(name, tmp_path):
  _, source = moe_cases.build_hf(name, tmp_path)
  _, params, state, kwargs = hf_import.import_hf_with_state(str(source),
                                                            progress=False)
  family = moe_families.family_of(hf_import.read_hf_config(str(source)))
  out = hf_export.export_hf(kwargs, params, state, to=family,
                            out_dir=str(tmp_path / 'out'), progress=False)
  original = safetensors_io.ShardedCheckpoint(str(source))
  exported = safetensors_io.ShardedCheckpoint(out)
  assert not any(k.endswith('gate_up_proj') for k in original.keys())
  assert exported.keys() == original.keys()
  for key in original.keys():
    assert tuple(exported.shape(key)) == tuple(original.shape(key)), key
    np.testing.assert_array_equal(exported.get(key), original.get(key),
                                  err_msg=key)
  # config.json holds everything the import reads.
  _, _, _, again = hf_import.import_hf_with_state(out, progress=False)
  assert again == kwargs
  check_logits(out, kwargs, params, state)


def randomise(params, seed):
  """Norm scales ~ 1 + N(0, 0.5²) and biases ~ N(0, 0.5²), so a wrong
  mapping of any of them shows (init makes them ones and zeros)."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(params)
  rng = np.random.default_rng(seed)
  out = []
  for path, a in leaves:
    name = jax.tree_util.keystr(path)
    if "'scale'" in name or "'bias'" in name:
      a = rng.normal(1.0 if "'scale'" in name else 0.0, 0.5,
                     np.shape(a)).astype(np.float32)
    out.append(jnp.asarray(a))
  return jax.tree_util.tree_unflatten(tree, out)


def full_qk_norm_dense():
  """A dense Llama-family decoder with OLMoE's attention: q/k RMSNorm over
  the whole projection, head_dim = d_model / num_heads, q/k/v/o biases."""
  kwargs = dict(
      vocab_size=128, d_model=48, num_layers=2, num_heads=4, head_dim=12,
      num_kv_heads=2, dense_ffn=True,
      ffn=dict(d_model=48, width=80, activation='swiglu', use_bias=False),
      norm='rmsnorm', norm_eps=1e-5, attention_bias='all', qk_norm='full',
      kv_projection='separate', tie_embeddings=False, output_bias=False,
      rope_theta=10000.0, rope_fraction=1.0, rope_scaling=None)
  variables = decoder.TransformerLM(**kwargs).init(
      jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
  return kwargs, randomise(nn.unbox(variables)['params'], seed=0)


def qkv_bias_only(kwargs, params):
  """The model with q/k/v biases and no o_proj bias (attention_bias='qkv')."""
  params = jax.tree.map(lambda a: a, params)       # a copy of the nesting
  for i in range(kwargs['num_layers']):
    att = dict(params[f'layer_{i}']['attention'])
    for j, name in enumerate(('query', 'key', 'value')):
      width = att[name]['kernel'].shape[1]
      bias = np.random.default_rng(i * 3 + j).normal(0, 0.5, (width,))
      att[name] = {**att[name], 'bias': jnp.asarray(bias, jnp.float32)}
    params[f'layer_{i}'] = {**params[f'layer_{i}'], 'attention': att}
  return dict(kwargs, attention_bias='qkv'), params


@pytest.fixture(scope='module')
def dense(tmp_path_factory):
  root = tmp_path_factory.mktemp('hf')
  out = {}
  for family in ('llama', 'mistral', 'qwen2_tied', 'qwen3'):
    _, directory = dense_cases.build_hf(family, root)
    _, params, kwargs = hf_import.import_hf(str(directory), progress=False)
    out[family] = (kwargs, params)
  out['qwen3_qkv_bias'] = qkv_bias_only(*out['qwen3'])
  out['full_qk_norm'] = full_qk_norm_dense()
  return out


def upcycled(dense_model, router, *, shared=0, shared_mix='half',
             **options):
  """An upcycled model whose routing shows in the logits: noisy experts,
  routers of std 0.3 and, for deepseek_v3, a random selection bias."""
  kwargs, params = dense_model
  moe_kwargs, moe_params, state = upcycle.upcycle(
      kwargs, params, router=router, num_experts=4, top_k=2,
      shared_experts=shared, shared_mix=shared_mix, noise=0.5, seed=3,
      router_options=dict(init_std=0.3, **options))
  rng = np.random.default_rng(5)
  state = jax.tree.map(
      lambda b: jnp.asarray(rng.normal(0, 0.1, b.shape), jnp.float32), state)
  return moe_kwargs, moe_params, state


# (dense model, router, shared experts, shared mix, router options, target)
UPCYCLED = [
    ('qwen3', 'smoe', 0, 'half', {}, 'qwen3_moe'),
    ('qwen3', 'smoe', 0, 'half', {'normalize_topk': False}, 'qwen3_moe'),
    # q/k/v biases only: Qwen3-MoE's o_proj bias is written as zeros.
    ('qwen3_qkv_bias', 'smoe', 0, 'half', {}, 'qwen3_moe'),
    ('full_qk_norm', 'smoe', 0, 'half', {}, 'olmoe'),
    ('full_qk_norm', 'smoe', 0, 'half', {'normalize_topk': False}, 'olmoe'),
    # Upcycled SharedE-V3: 0.5 (routed + shared), both halved for Glm4Moe.
    ('mistral', 'deepseek_v3', 1, 'half', {}, 'glm4_moe'),
    ('qwen3', 'deepseek_v3', 2, 'add',
     dict(n_group=2, topk_group=1, routed_scaling_factor=2.5), 'glm4_moe'),
    ('qwen2_tied', 'sigmoid', 0, 'half', {}, 'glm4_moe'),
    ('mistral', 'sigmoid', 1, 'half', {'normalize_topk': False},
     'glm4_moe'),
    # Two shared experts: one Qwen2-MoE shared MLP of width 2w.
    ('qwen2_tied', 'deepseek_v2', 2, 'add', {}, 'qwen2_moe'),
    ('mistral', 'deepseek_v2', 2, 'half', {}, 'qwen2_moe'),
]


@pytest.mark.parametrize('family,router,shared,mix,options,target', UPCYCLED)
def test_upcycled_export_matches_transformers(dense, family, router, shared,
                                              mix, options, target,
                                              tmp_path):
  kwargs, params, state = upcycled(dense[family], router, shared=shared,
                                   shared_mix=mix, **options)
  out = hf_export.export_hf(kwargs, params, state, to=target,
                            out_dir=str(tmp_path / target), progress=False)
  config = json.loads((tmp_path / target / 'config.json').read_text())
  assert config['architectures'] == [ARCHITECTURES[target]]
  assert config['norm_topk_prob'] == options.get('normalize_topk', True)
  exported = safetensors_io.ShardedCheckpoint(out)
  if target == 'glm4_moe':
    assert config['n_shared_experts'] == shared
    key = 'model.layers.1.mlp.gate.e_score_correction_bias'
    want = (state['layer_1']['moe']['router']['router']['bias']
            if router == 'deepseek_v3' else np.zeros(4))
    np.testing.assert_array_equal(exported.get(key), want)
  if target == 'qwen2_moe':
    assert config['shared_expert_intermediate_size'] == (
        shared * config['moe_intermediate_size'])
  if family == 'qwen3_qkv_bias':
    np.testing.assert_array_equal(
        exported.get('model.layers.0.self_attn.o_proj.bias'), np.zeros(48))
  check_logits(out, kwargs, params, state)


def test_routers_a_class_cannot_hold_are_refused(dense, tmp_path):
  def refused(model, target, match):
    with pytest.raises(hf_export.ExportError, match=match):
      hf_export.export_hf(*model, to=target, out_dir=str(tmp_path / 'x'))

  qwen3, mistral = dense['qwen3'], dense['mistral']
  refused(upcycled(qwen3, 'sigmoid'), 'qwen3_moe',
          "Qwen3-MoE routes softmax top-k; classes that hold router "
          "'sigmoid': glm4_moe")
  refused(upcycled(dense['full_qk_norm'], 'deepseek_v3'), 'olmoe',
          "OLMoE routes softmax top-k; classes that hold router "
          "'deepseek_v3': glm4_moe")
  refused(upcycled(qwen3, 'smoe'), 'glm4_moe',
          'Glm4Moe routes sigmoid top-k.*router \'smoe\': mixtral, '
          'qwen2_moe, qwen3_moe, olmoe')
  refused(upcycled(qwen3, 'deepseek_v2', shared=1), 'qwen3_moe',
          'Qwen3-MoE has no shared expert.*qwen2_moe')
  refused(upcycled(qwen3, 'xmoe'), 'glm4_moe',
          "no stock Hugging Face class holds router 'xmoe'")
  # Attention the class lacks (a unit-scale q/k norm still normalises).
  refused(upcycled(mistral, 'smoe'), 'qwen3_moe',
          'Qwen3-MoE normalises q and k per head')
  refused(upcycled(qwen3, 'smoe'), 'olmoe',
          'OLMoE normalises q and k over the whole projection')
  refused(upcycled(dense['llama'], 'deepseek_v3'), 'glm4_moe',
          'Glm4Moe has q/k/v biases and no output bias')
  refused(upcycled(mistral, 'deepseek_v3', shared=1,
                   shared_mix='sigmoid_gate'), 'glm4_moe',
          "Glm4Moe's shared experts are ungated")
  kwargs, params, _ = upcycled(mistral, 'deepseek_v3')
  refused((kwargs, params, {}), 'glm4_moe',
          'router_state has no layer_0/moe/router/router/bias')
  wide = dict(upcycled(dense['full_qk_norm'], 'smoe')[0], head_dim=16)
  with pytest.raises(hf_export.ExportError, match="OLMoE's q_norm is "
                     'hidden_size=48 wide'):
    hf_export.check_exportable(wide, 'olmoe')
  assert not list(tmp_path.iterdir())          # nothing partial written
