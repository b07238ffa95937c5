"""Every experiment config loads, validates and builds (moe_jax/config_lib.py).

Models are only traced (jax.eval_shape): no parameters are materialised, so
the 154M / 660M configs cost a trace each. Identical models (e.g. the `:tiny`
variants of a router at both sizes) are traced once.
"""

import ast
import importlib.util
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import pytest

from moe_jax import config_lib
from moe_jax import lm_experiment
from moe_jax import models
from moe_jax.models import decoder
from moe_jax.moe import router as router_lib

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'
CONFIG_FILES = sorted(CONFIG_DIR.glob('*.py'))


def _load(path: pathlib.Path):
  spec = importlib.util.spec_from_file_location(f'configs.{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(name: str, arg=None):
  return _load(CONFIG_DIR / f'{name}.py').get_config(arg)


_COUNTS = {}


def param_count(config) -> int:
  """Trainable parameters of the config's model, by eval_shape (memoised)."""
  # The model is a function of the model and ffn kwargs and the dtype only.
  key = json.dumps([config.model.to_dict(), decoder.ffn_kwargs(config),
                    config.train.dtype], sort_keys=True, default=str)
  if key not in _COUNTS:
    model = models.build(config)
    tokens = jnp.zeros((1, 8), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens))
    _COUNTS[key] = sum(math.prod(x.shape)
                       for x in jax.tree.leaves(shapes['params']))
  return _COUNTS[key]


def test_every_router_has_both_sizes():
  names = {p.stem for p in CONFIG_FILES}
  for router in list(router_lib.ROUTERS) + ['dense']:
    for size in lm_experiment.SIZES:
      assert f'{router}_{size}' in names


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: p.stem)
def test_config_loads_validates_and_builds(path):
  module = _load(path)
  router, size = path.stem.rsplit('_', 1)
  # Docstring: the command, hardware, runtime, expected result and paper.
  doc = module.__doc__
  assert f'--config=configs/{path.name} --workdir=' in doc
  assert f'--config=configs/{path.name}:tiny --workdir=' in doc
  for word in ('Hardware:', 'Runtime:', 'Expected:', 'Paper:'):
    assert word in doc, word
  # Config files import helpers from config_lib only, never from each other.
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom):
      assert not (node.module or '').startswith('configs')
    if isinstance(node, ast.Import):
      assert not any(a.name.startswith('configs') for a in node.names)

  full, tiny = module.get_config(), module.get_config('tiny')
  for config in (full, tiny):
    config_lib.validate(config)
    assert config.size == size
    assert config.model.dense_ffn == (router == 'dense')
    if router != 'dense':
      assert config.moe.router == router
    json.loads(config.to_json())          # the resolved config is writable
  assert full.train.dtype == 'bfloat16' and tiny.train.dtype == 'float32'
  assert tiny.data.source == 'synthetic'
  assert param_count(tiny) < 1e6
  full_count = param_count(full)
  print(f'{path.stem}: {full_count:,} parameters')
  target = 157.9e6 if size == '154m' else 678.3e6
  if router == 'dense':
    target = 35.8e6 if size == '154m' else 129.6e6   # algorithms.md §6.1
  # Every MoE router is within 1% of its size's total (extra router rows:
  # MoE++ specials, TC-MoE signs and nulls, XMoE's low rank, HyperRouter).
  assert abs(full_count - target) / target < 0.01, full_count


@pytest.mark.parametrize('name, reference', [
    ('smoe_154m', 157.9e6), ('smoe_660m', 678.3e6), ('dense_154m', 35.8e6),
    ('deepseek_v2_154m', 157_919_040)])
def test_parameter_counts_match_reference(name, reference):
  count = param_count(get_config(name))
  print(f'{name}: {count:,} parameters (reference {reference:,.0f})')
  assert abs(count - reference) / reference < 0.02


def test_size_recipes():
  small, large = get_config('smoe_154m'), get_config('smoe_660m')
  # algorithms.md §6.1-6.2.
  assert (small.model.d_model, small.model.num_layers, small.model.head_dim,
          small.moe.expert_width) == (512, 16, 82, 128)
  assert (large.model.d_model, large.model.num_layers, large.model.head_dim,
          large.moe.expert_width) == (1024, 18, 128, 256)
  assert (small.moe.num_experts, small.moe.top_k) == (66, 8)
  assert (small.train.steps, small.train.warmup_steps,
          small.train.grad_clip) == (100_000, 0, 0.1)
  assert (large.train.steps, large.train.warmup_steps,
          large.train.grad_clip) == (400_000, 4_000, 0.25)
  assert large.train.cosine_steps == 400_000
  for c in (small, large):
    t = c.train
    assert (t.learning_rate, t.b1, t.b2, t.eps, t.weight_decay,
            t.min_lr_ratio) == (2.5e-4, 0.9, 0.999, 1e-8, 0.01, 0.1)
    assert (t.global_batch, t.seq_len, t.seed) == (64, 1024, 42)
    assert c.data.vocab_size == c.model.vocab_size == 8000
    assert dict(c.loss.coefficients) == {'balance': 0.01}
    assert c.loss.layer_reduction == 'sum'
  ds = get_config('deepseek_v3_154m')
  assert (ds.moe.num_experts, ds.moe.top_k, ds.moe.shared_experts,
          ds.moe.shared_width) == (64, 6, 2, None)
  # Compute matching (§6.4): k m = 2d, DeepSeek (k m + 2 m) = 2d; tiny: d.
  for name in ('smoe', 'deepseek_v2'):
    for size in lm_experiment.SIZES:
      for arg, active in ((None, 2), ('tiny', 1)):
        c = get_config(f'{name}_{size}', arg).moe
        width = c.top_k * c.expert_width + c.shared_experts * c.expert_width
        assert width == active * c.d_model


def test_init_stds_match_libmoe_table():
  # algorithms.md §2.1 derived standard deviations.
  table = {(16, 512, 128): (0.015625, 0.003847, 0.003906, 0.022097),
           (18, 1024, 256): (0.010417, 0.002564, 0.002604, 0.014731)}
  for (layers, d, m), (w1, w2_66, w2_64, w2s) in table.items():
    std66 = lm_experiment.libmoe_init_stds(layers, d, 66, m, 2 * m)
    std64 = lm_experiment.libmoe_init_stds(layers, d, 64, m, 2 * m)
    for got, want in ((std66['w_in'], w1), (std66['router'], w1),
                      (std66['shared_w_in'], w1), (std66['w_out'], w2_66),
                      (std64['w_out'], w2_64), (std64['shared_w_out'], w2s)):
      assert got == pytest.approx(want, abs=1e-6)
  c = get_config('deepseek_v3_660m')
  assert c.moe.w_out_std == pytest.approx(0.002604, abs=1e-6)
  assert c.moe.router_options.init_std == pytest.approx(0.010417, abs=1e-6)


def test_router_options():
  assert get_config('xmoe_154m').moe.router_options.temperature == 0.3
  assert get_config('cosine_154m').moe.router_options.temperature == 0.2
  v3 = get_config('deepseek_v3_154m')
  assert v3.moe.router_options.bias_update_rate == 0.001
  libmoe = get_config('deepseek_v3_154m', 'preset=sharede_v3_libmoe')
  assert libmoe.moe.router_options.bias_update_rate == 0.0
  assert dict(libmoe.loss.coefficients) == {'balance': 0.01}
  grouped = get_config('deepseek_v3_660m', 'n_group=8,topk_group=4')
  config_lib.validate(grouped)
  sigma = get_config('sigmoid_154m', 'tiny,preset=sigma_moe_csordas')
  config_lib.validate(sigma)
  assert sigma.moe.losses == ('entropy_global',)
  assert sigma.moe.router_options.normalize_topk is False
  tc = get_config('tc_moe_154m')
  assert dict(tc.loss.coefficients) == {'tc_balance': 0.01, 'tc_reward': 1e-5}
  assert tc.moe.router_options.num_null == 8
  remoe = get_config('remoe_154m')
  assert dict(remoe.loss.coefficients) == {'remoe_l1': 1.0}
  assert (remoe.loss.remoe.lambda0, remoe.loss.remoe.alpha) == (1e-8, 1.2)
  mpp = get_config('moe_plus_plus_154m')
  opts = mpp.moe.router_options
  assert (opts.n_zero, opts.n_copy, opts.n_const) == (1, 1, 6)
  assert get_config('hyper_154m').moe.losses == ()
  assert get_config('smoe_154m', 'demo').train.steps == 1000
  # Parity flags exist (so they can be overridden) and are off.
  assert dict(get_config('xmoe_154m').moe.router_options.parity) == {
      'xmoe_double_softmax': False}


def test_derived_fields_follow_overrides():
  c = get_config('hyper_154m', 'tiny')
  c.train.steps = 50
  c.moe.top_k = 2
  assert c.train.cosine_steps == 50
  assert c.moe.router_options.total_steps == 50
  assert c.moe.router_options.hyper_k_min == 1
  c.train.seq_len = 32
  c.data.vocab_size = 300
  assert c.data.seq_len == 32 and c.model.vocab_size == 300
  # Setting a derived field decouples it; the source keeps its value.
  c.train.cosine_steps = 80
  assert c.train.steps == 50
  config_lib.validate(c)


def test_token_cap_is_libmoes_and_follows_overrides():
  # LibMoE tokenises (stop_after + 100) steps of batches (§6.3); our windows
  # hold S + 1 = 1025 tokens. By hand: (100,000 + 100) x 64 x 1,025.
  assert get_config('smoe_154m').data.max_tokens == 6_566_560_000
  # (400,000 + 100) x 64 x 1,025.
  assert get_config('deepseek_v3_660m').data.max_tokens == 26_246_560_000
  c = get_config('smoe_154m')
  c.train.steps = 900
  c.train.global_batch = 32
  c.train.seq_len = 511
  assert c.data.max_tokens == 1_000 * 32 * 512
  # The demo run's 1,000 steps: 1,100 x 64 x 1,025.
  assert get_config('smoe_154m', 'demo').data.max_tokens == 72_160_000
  # Set, it stays; None and 0 mean the whole source.
  c.data.max_tokens = 12_345
  c.train.steps = 10
  assert c.data.max_tokens == 12_345
  for cap in (None, 0):
    c.data.max_tokens = cap
    config_lib.validate(c)
  # The tiny configs read their synthetic corpus whole.
  assert get_config('smoe_154m', 'tiny').data.max_tokens is None
  assert get_config('smoe_154m').data.shard_seed == 123


def test_parse_arg():
  args = config_lib.parse_arg('tiny,preset=x,n=3,r=0.5', tiny=False,
                              preset='a', n=1, r=1.0)
  assert (args.tiny, args.preset, args.n, args.r) == (True, 'x', 3, 0.5)
  assert config_lib.parse_arg(None, tiny=False).tiny is False
  assert config_lib.parse_arg('tiny=false', tiny=True).tiny is False
  with pytest.raises(ValueError, match='config arg bogus'):
    config_lib.parse_arg('bogus=1', tiny=False)
  with pytest.raises(ValueError, match='config arg n'):
    config_lib.parse_arg('n=x', n=1)
  with pytest.raises(ValueError, match='config arg preset'):
    get_config('sigmoid_154m', 'preset=nope')


def _set(config, path, value):
  *parents, leaf = path.split('.')
  for p in parents:
    config = config[p]
  config[leaf] = value


@pytest.mark.parametrize('path, value, field', [
    ('moe.top_k', 17, 'moe.top_k'),
    ('moe.router', 'nope', 'moe.router'),
    ('loss.coefficients.balance', -0.01, 'loss.coefficients.balance'),
    ('moe.backend', 'nope', 'moe.backend'),
    ('moe.losses', ('balance', 'nope'), 'moe.losses'),
    ('moe.losses', ('balance', 'z_loss'), 'loss.coefficients'),
    ('moe.shared_mix', 'nope', 'moe.shared_mix'),
    ('moe.balance_count_mode', 'nope', 'moe.balance_count_mode'),
    ('moe.router_options.temperature', -1.0,
     'moe.router_options.temperature'),
    ('moe.num_experts', 0, 'moe.num_experts'),
    ('model.num_heads', 0, 'model.num_heads'),
    ('moe.w_out_std', -1.0, 'moe.w_out_std'),
    ('loss.layer_reduction', 'max', 'loss.layer_reduction'),
    ('train.dtype', 'int8', 'train.dtype'),
    ('train.grad_accum', 3, 'train.global_batch'),
    ('train.warmup_steps', 500, 'train.warmup_steps'),
    ('data.source', 'nope', 'data.source'),
    ('data.max_tokens', -1, 'data.max_tokens'),
    ('data.shard_seed', -1, 'data.shard_seed'),
    ('mesh.tensor', 3, 'model.num_heads'),
    ('mesh.expert', 3, 'mesh.expert'),
])
def test_validate_names_the_field(path, value, field):
  config = get_config('smoe_154m', 'tiny')
  config.unlock()
  _set(config, path, value)
  with pytest.raises(ValueError, match=f'^{field}'.replace('.', r'\.')):
    config_lib.validate(config)


def test_validate_unknown_router_option_and_mesh():
  config = get_config('smoe_154m', 'tiny')
  config.moe.router_options.bogus = 1
  with pytest.raises(ValueError, match=r'^moe\.router_options'):
    config_lib.validate(config)
  config = get_config('smoe_154m', 'tiny')
  config_lib.validate(config, num_devices=8)
  config.mesh.expert = 4
  config.mesh.data = 4
  with pytest.raises(ValueError, match='^mesh'):
    config_lib.validate(config, num_devices=8)
  config.mesh.data = 2
  config.train.global_batch = 4
  with pytest.raises(ValueError, match=r'^train\.global_batch'):
    config_lib.validate(config, num_devices=8)
