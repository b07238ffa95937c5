"""Remote-code export: transformers runs moe_jax's models (formats.md §5.1).

Every router is exported twice, as (a) LibMoE's tiny LM stack from its
configs/<router>_154m.py:tiny (LayerNorm, partial RoPE, fused K/V, ReLU
bias-free experts, output bias) and (b) an upcycled tiny random Llama
(RMSNorm, GQA, full RoPE, SwiGLU experts); then the dense LibMoE baseline,
dense decoders covering the other decoder options, and (slow) upcycled
models with each router's forward-relevant options and parity flags. Each
directory is loaded with AutoModelForCausalLM(trust_remote_code=True)
offline, with no missing or unexpected keys, and its logits at the real
tokens of a right-padded batch must equal moe_jax's eval forward to 1e-4
(float32).
Every parameter is perturbed from its init, so that zero biases and unit
norm scales cannot hide a wrong mapping.
"""

import ast
import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from moe_jax import config_lib  # pylint: disable=g-import-not-at-top
from moe_jax import models  # pylint: disable=g-import-not-at-top
from moe_jax.convert import remote_code  # pylint: disable=g-import-not-at-top
from moe_jax.convert import safetensors_io  # pylint: disable=g-import-not-at-top
from moe_jax.convert import upcycle  # pylint: disable=g-import-not-at-top
from moe_jax.models import decoder  # pylint: disable=g-import-not-at-top
from moe_jax.moe import router as router_lib  # pylint: disable=g-import-not-at-top
from tests.convert.logits import jax_logits  # pylint: disable=g-import-not-at-top
from tests.convert.logits import torch_logits  # pylint: disable=g-import-not-at-top

ROUTERS = ['smoe', 'sigmoid', 'xmoe', 'cosine', 'perturbed_cosine', 'hyper',
           'deepseek_v2', 'deepseek_v3', 'moe_plus_plus', 'tc_moe', 'remoe']
TOL = dict(atol=1e-4, rtol=1e-4)


def perturb(tree, seed, std=0.05):
  """Every leaf + N(0, std^2), so zero-init biases and unit scales vary."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a: jnp.asarray(np.asarray(a) + rng.normal(0, std, a.shape),
                            jnp.float32), tree)


def load(directory):
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      directory, trust_remote_code=True, local_files_only=True,
      dtype=torch.float32, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  return model.eval()


def export_and_compare(kwargs, params, router_state, tmp_path):
  """Exports, loads with transformers, compares; returns the torch model."""
  directory = remote_code.export_remote_code(
      kwargs, params, router_state, out_dir=str(tmp_path / 'export'))
  model = load(directory)
  want = jax_logits(kwargs, params, router_state)
  np.testing.assert_allclose(torch_logits(model), want,
                             **TOL)
  return model, want


def init(kwargs, seed=0):
  """(params, router_state) of TransformerLM(**kwargs), unboxed."""
  variables = nn.unbox(decoder.TransformerLM(**kwargs).init(
      {'params': jax.random.key(seed), 'router': jax.random.key(seed + 1)},
      jnp.zeros((1, 2), jnp.int32)))
  return variables['params'], dict(variables.get('router_state', {}))


def check_bias_is_used(model, want, vocab_size):
  """With the DeepSeek-V3 bias zeroed the logits change: it was exercised."""
  with torch.no_grad():
    for name, buf in model.named_buffers():
      if name.endswith('router.router.bias'):
        buf.zero_()
  assert not np.allclose(torch_logits(model), want, **TOL)


def test_the_routers_are_every_registered_router():
  assert sorted(ROUTERS) == sorted(router_lib.ROUTERS)


# ------------------------------------------------ (a) LibMoE's LM stack ---

def libmoe_kwargs(name):
  """TransformerLM kwargs of configs/<name>_154m.py:tiny (2 layers, V 512)."""
  config = config_lib.load_config(f'configs/{name}_154m.py:tiny')
  kwargs = dict(config.model.to_dict(), ffn=decoder.ffn_kwargs(config),
                dtype=jnp.dtype(config.train.dtype))
  assert decoder.TransformerLM(**kwargs) == models.build(config)
  return kwargs


@pytest.mark.parametrize('router', ROUTERS + ['dense'])
def test_libmoe_tiny_matches_moe_jax(router, tmp_path):
  kwargs = libmoe_kwargs(router)
  params, state = init(kwargs)
  params = perturb(params, seed=1)
  if router == 'deepseek_v3':
    # A learnt selection bias, large enough to change some selections.
    state = perturb(state, seed=2, std=0.1)
  model, want = export_and_compare(kwargs, params, state, tmp_path)
  if router == 'deepseek_v3':
    check_bias_is_used(model, want, kwargs['vocab_size'])


# ------------------------------------------------ (b) upcycled tiny Llama ---

def llama_kwargs(**overrides):
  """A tiny dense Llama as families.model_kwargs gives it (GQA 4 / 2)."""
  kwargs = dict(
      vocab_size=128, d_model=32, num_layers=2, num_heads=4, head_dim=8,
      num_kv_heads=2, dense_ffn=True,
      ffn=dict(d_model=32, width=48, activation='swiglu', use_bias=False),
      norm='rmsnorm', norm_eps=1e-5, attention_bias='none', qk_norm='none',
      kv_projection='separate', tie_embeddings=False, output_bias=False,
      rope_theta=10000.0, rope_fraction=1.0, rope_scaling=None)
  kwargs.update(overrides)
  return kwargs


@pytest.fixture(scope='module')
def llama():
  kwargs = llama_kwargs()
  params, _ = init(kwargs, seed=3)
  return kwargs, perturb(params, seed=4)


# Shared experts where the algorithm has them, one per shared mix.
UPCYCLE_OPTIONS = {
    'deepseek_v2': dict(shared_experts=1, shared_mix='sigmoid_gate'),
    'deepseek_v3': dict(shared_experts=1, shared_mix='half'),
}


@pytest.mark.parametrize('router', ROUTERS)
def test_upcycled_llama_matches_moe_jax(llama, router, tmp_path):
  kwargs, params, state = upcycle.upcycle(
      *llama, router=router, num_experts=4, top_k=2, noise=0.1,
      **UPCYCLE_OPTIONS.get(router, {}))
  if router == 'deepseek_v3':
    state = perturb(state, seed=5, std=0.1)
  model, want = export_and_compare(kwargs, params, state, tmp_path)
  if router == 'deepseek_v3':
    check_bias_is_used(model, want, kwargs['vocab_size'])


# Forward-relevant router options and LibMoE parity flags (algorithms.md §5):
# 13 more compiled models, so marked slow (run with -m slow).
VARIANTS = [
    ('smoe', dict(normalize_topk=False)),
    ('smoe', dict(noise='noisy_topk', drop_top=1)),
    ('sigmoid', dict(normalize_topk=False)),
    ('xmoe', dict(temperature=0.5, xmoe_dim=3,
                  parity={'xmoe_double_softmax': True})),
    ('cosine', dict(router_init='torch_default',
                    parity={'bias_on_probs': True})),
    ('perturbed_cosine', dict(cosine_theta=0.3,
                              parity={'bias_on_probs': True})),
    ('deepseek_v3', dict(n_group=2, topk_group=1, routed_scaling_factor=2.5)),
    ('deepseek_v3', dict(n_group=2, topk_group=1,
                         parity={'group_mask_zero': True})),
    ('moe_plus_plus', dict(router_depth=2, zero_weight_mode='keep', n_const=2,
                           parity={'moepp_mul_topk': True})),
    ('moe_plus_plus', dict(drop_top=1, gate_residual=False)),
    ('tc_moe', dict(num_null=1, tc_neg_offset=-0.5)),
    ('remoe', dict(remoe_max_active=3)),
    ('remoe', dict(parity={'remoe_libmoe': True})),
]


@pytest.mark.slow
@pytest.mark.parametrize('router,options', VARIANTS,
                         ids=[f'{r}-{i}' for i, (r, _) in enumerate(VARIANTS)])
def test_router_options_match_moe_jax(llama, router, options, tmp_path):
  kwargs, params, state = upcycle.upcycle(
      *llama, router=router, num_experts=4, top_k=2, noise=0.1, seed=6,
      router_options=options)
  # Stronger routers than upcycling's std 0.02, so the options matter.
  params = perturb(params, seed=7, std=0.2)
  export_and_compare(kwargs, params, state, tmp_path)


# --------------------------------------------------- decoder options ---

DECODERS = {
    # Qwen3-like: per-head q/k norm, all biases, MQA, tied, YaRN; GELU FFN.
    'per_head_tied_yarn': llama_kwargs(
        num_kv_heads=1, qk_norm='per_head', attention_bias='all',
        tie_embeddings=True,
        rope_scaling=dict(rope_type='yarn', factor=4.0,
                          original_max_position_embeddings=4),
        ffn=dict(d_model=32, width=48, activation='gelu', use_bias=True)),
    # OLMoE-like full q/k norm, q/k/v biases, fused K/V, Llama 3 RoPE.
    'full_qk_llama3': llama_kwargs(
        qk_norm='full', attention_bias='qkv', kv_projection='fused',
        rope_fraction=0.5, rope_theta=500.0,
        rope_scaling=dict(rope_type='llama3', factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0,
                          original_max_position_embeddings=4),
        ffn=dict(d_model=32, width=48, activation='gelu_tanh',
                 use_bias=True)),
    # LayerNorm with linear RoPE scaling on a quarter of each head.
    'layernorm_linear': llama_kwargs(
        norm='layernorm', rope_fraction=0.25, output_bias=True,
        rope_scaling=dict(rope_type='linear', factor=2.0)),
}


@pytest.mark.parametrize('name', sorted(DECODERS))
def test_decoder_options_match_moe_jax(name, tmp_path):
  kwargs = DECODERS[name]
  params, _ = init(kwargs, seed=8)
  export_and_compare(kwargs, perturb(params, seed=9), {}, tmp_path)


# ------------------------------------------------------ the directory ---

def test_directory_contents(llama, tmp_path):
  kwargs, params, state = upcycle.upcycle(*llama, router='hyper',
                                          num_experts=4, top_k=2)
  out, tok = tmp_path / 'export', tmp_path / 'tokenizer'
  tok.mkdir()
  (tok / 'tokenizer.json').write_text('{"fake": true}')
  remote_code.export_remote_code(kwargs, params, state, out_dir=str(out),
                                 tokenizer_dir=str(tok),
                                 max_position_embeddings=256)
  assert (out / 'tokenizer.json').read_text() == '{"fake": true}'
  config = json.loads((out / 'config.json').read_text())
  assert config['model_type'] == 'moe_jax'
  assert config['architectures'] == ['MoeJaxForCausalLM']
  assert config['auto_map'] == remote_code.AUTO_MAP
  assert config['max_position_embeddings'] == 256
  assert config['moe_jax_kwargs'] == remote_code.plain_json(kwargs)
  assert config['moe_jax_kwargs']['ffn']['router'] == 'hyper'
  assert config['moe_jax_router']['top_k'] == 2
  for name in remote_code.SOURCE_FILES:
    source = pathlib.Path(remote_code.SOURCE_DIR, name)
    assert (out / name).read_bytes() == source.read_bytes()
    # The package needs torch and transformers only: never moe_jax or jax.
    for node in ast.walk(ast.parse(source.read_text())):
      if isinstance(node, ast.Import):
        roots = {a.name.split('.')[0] for a in node.names}
      elif isinstance(node, ast.ImportFrom):
        roots = {(node.module or '').split('.')[0]} if not node.level else set()
      else:
        continue
      assert roots <= {'math', 'torch', 'transformers'}, (name, roots)
  # HyperRouter's frozen hypernetwork sits beside the router's parameters.
  weights = safetensors_io.SafetensorsFile(out / 'model.safetensors').keys()
  assert 'layer_0.moe.router.router.hyper_w1' in weights
  assert 'layer_0.moe.router.router.embedding' in weights


def test_refusals_write_nothing(llama, tmp_path):
  kwargs, params, state = upcycle.upcycle(*llama, router='smoe',
                                          num_experts=4, top_k=2)
  capped = dict(kwargs, ffn=dict(kwargs['ffn'], capacity_factor=1.0))
  with pytest.raises(remote_code.RemoteCodeError, match='capacity_factor'):
    remote_code.export_remote_code(capped, params, state,
                                   out_dir=str(tmp_path / 'a'))
  assert not list(tmp_path.iterdir())
  (tmp_path / 'b').mkdir()
  with pytest.raises(FileExistsError):
    remote_code.export_remote_code(kwargs, params, state,
                                   out_dir=str(tmp_path / 'b'))
  assert [p.name for p in tmp_path.iterdir()] == ['b']
