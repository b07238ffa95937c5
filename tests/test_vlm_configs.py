"""Every configs/vlm/<router>_<stage>.py parses, follows LibMoE's three-stage
recipe (algorithms.md §10.2) and validates once its model is resolved."""

import pathlib

import pytest

from moe_jax import config_lib
from moe_jax import vlm_experiment

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'vlm'
CONFIG_FILES = sorted(CONFIG_DIR.glob('*.py'))


def test_one_file_per_router_and_stage():
  names = {p.stem for p in CONFIG_FILES}
  assert names == {f'{r}_{s}' for r in vlm_experiment.ROUTERS
                   for s in vlm_experiment.STAGES}


@pytest.mark.parametrize('path', CONFIG_FILES, ids=lambda p: p.stem)
def test_config_parses_with_and_without_tiny(path):
  for arg in ('', ':tiny'):
    config = config_lib.load_config(f'{path}{arg}')
    assert config.model_name == 'llava'
    assert config.stage == path.stem.rsplit('_', 1)[1]


def test_stage_recipes():
  pt, pft, sft = (config_lib.load_config(str(CONFIG_DIR / f'smoe_{s}.py'))
                  for s in ('pt', 'pft', 'sft'))
  # LR, batch and what trains (§10.2, v2).
  assert (pt.train.learning_rate, pft.train.learning_rate,
          sft.train.learning_rate) == (1e-3, 2e-6, 4e-6)
  assert (pt.train.global_batch, pft.train.global_batch,
          sft.train.global_batch) == (256, 24, 32)
  assert tuple(pt.train.trainable) == ('projector/.*',)
  assert tuple(sft.train.trainable) == ('.*',)
  assert (pt.data.template, pft.data.template) == ('plain', 'phi35')
  assert (pt.data.image_aspect, pft.data.image_aspect) == ('resize', 'pad')
  # Dense stages, then the tower and projector MoE: E 6, k 3, top-1
  # balance 0.01 + z 0.001, averaged over layers.
  assert (pft.vlm.tower_ffn, pft.vlm.projector_ffn) == ('dense', 'dense')
  assert (sft.vlm.tower_ffn, sft.vlm.projector_ffn) == ('moe', 'moe')
  assert (sft.moe.num_experts, sft.moe.top_k) == (6, 3)
  assert dict(sft.loss.coefficients) == {'balance': 0.01, 'z_loss': 0.001}
  assert not dict(pft.loss.coefficients)
  assert (sft.moe.balance_count_mode, sft.loss.layer_reduction) == ('top1',
                                                                    'mean')
  assert tuple(sft.vlm.s2_scales) == (1, 3)
  for config in (pt, pft, sft):
    assert config.train.min_lr_ratio == 0.0
    assert config.train.weight_decay == 0.0


def test_shared_expert_layouts_count_the_shared_expert_among_e():
  # LibMoE's SharedE: one of the E = 6 experts is always on, k - 1 routed.
  sft = config_lib.load_config(str(CONFIG_DIR / 'deepseek_v2_sft.py'))
  assert (sft.moe.num_experts, sft.moe.top_k, sft.moe.shared_experts,
          sft.moe.shared_mix) == (5, 2, 1, 'half')


def test_unknown_router_or_stage_is_named():
  with pytest.raises(ValueError, match='router'):
    vlm_experiment.experiment('remoe', 'sft', None)
  with pytest.raises(ValueError, match='stage'):
    vlm_experiment.experiment('smoe', 'dpo', None)


def _resolved(stage: str):
  """A tiny config with the fields resolve() fills, set by hand."""
  config = config_lib.load_config(str(CONFIG_DIR / f'smoe_{stage}.py:tiny'))
  model = dict(vocab_size=512, d_model=64, num_layers=2, num_heads=4,
               head_dim=16)
  for name, value in model.items():
    config.model[name] = value
  config.dense = config_lib.ConfigDict(dict(
      d_model=64, width=128, activation='swiglu', use_bias=False,
      w_in_std=0.02, w_out_std=0.02))
  vision = dict(kind='siglip', image_size=32, patch_size=8, num_channels=3,
                d_model=32, num_layers=3, num_heads=4, mlp_width=64,
                activation='gelu_tanh', norm_eps=1e-6)
  for name, value in vision.items():
    config.vision[name] = value
  config.vlm.projector_width = 64
  config.vlm.image_token_id = 511
  config.data.vocab_size = 512
  config.moe.d_model, config.moe.expert_width = 32, 64
  config.moe.activation = 'gelu_tanh'
  return config


def test_resolved_tiny_stages_validate():
  for stage in ('pt', 'pft', 'sft'):
    config_lib.validate(_resolved(stage), num_devices=1)


@pytest.mark.parametrize('field,value,message', [
    ('vlm.tower_ffn', 'sparse', 'vlm.tower_ffn'),
    ('vlm.s2_scales', (3,), 'vlm.s2_scales'),
    ('vision.kind', 'vit', 'vision.kind'),
    ('vision.image_size', 30, 'vision.image_size'),
    ('train.trace_every', 10, 'train.trace_every'),
])
def test_bad_vlm_fields_are_named(field, value, message):
  config = _resolved('sft')
  part, name = field.split('.')
  config[part][name] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config, num_devices=1)


def test_dense_stage_refuses_aux_losses():
  config = _resolved('pft')
  config.loss.coefficients = config_lib.ConfigDict({'balance': 0.01})
  config.moe.losses = ('balance',)
  with pytest.raises(ValueError, match='loss.coefficients'):
    config_lib.validate(config, num_devices=1)
