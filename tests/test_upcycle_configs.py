"""configs/upcycle/*.py: every file loads, documents its commands, and asks
for the Hugging Face directory it upcycles."""

import pathlib

import pytest

from moe_jax import config_lib

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / 'configs' /
                  'upcycle').glob('*.py'))


def test_there_are_upcycling_configs():
  assert {p.stem for p in CONFIGS} >= {'llama_smoe', 'qwen2_deepseek_v2'}


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.stem)
def test_upcycle_config_loads_and_needs_hf_path(path):
  doc = path.read_text()
  assert f'--config=configs/upcycle/{path.name} --config.init.hf_path=' in doc
  assert f'--config=configs/upcycle/{path.name}:tiny' in doc
  family, router = path.stem.split('_', 1)
  for arg in ('', ':tiny', ':tiny,train_only=moe'):
    config = config_lib.load_config(f'{path}{arg}')
    assert config.init.upcycle.router == router == config.moe.router
    with pytest.raises(ValueError, match='init.upcycle.router: expected '
                       "'' unless init.hf_path"):
      config_lib.validate(config)
  moe_only = config_lib.load_config(f'{path}:tiny,train_only=moe')
  assert tuple(moe_only.train.trainable) == (r'layer_\d+/moe/.*',)
  with pytest.raises(ValueError, match='config arg train_only'):
    config_lib.load_config(f'{path}:train_only=attention')
