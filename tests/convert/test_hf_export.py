"""Exporting to Hugging Face: transformers loads what moe_jax writes.

Dense models round-trip: import, export, and the key names, shapes and
values equal the original save_pretrained's; from_pretrained logits equal
moe_jax's to 1e-4. Upcycled tiny Llama / Qwen2 models export to Mixtral and
Qwen2-MoE and transformers computes the same logits (to 1e-4); routers a
class cannot hold are refused with the classes that can.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from moe_jax.convert import hf_export  # pylint: disable=g-import-not-at-top
from moe_jax.convert import hf_import  # pylint: disable=g-import-not-at-top
from moe_jax.convert import safetensors_io  # pylint: disable=g-import-not-at-top
from moe_jax.convert import upcycle  # pylint: disable=g-import-not-at-top
from tests.convert import logits  # pylint: disable=g-import-not-at-top
from tests.convert import test_hf_import as hf_cases  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  root = tmp_path_factory.mktemp('hf')
  out = {}
  for family in ('llama', 'mistral', 'qwen2_tied', 'qwen3'):
    _, directory = hf_cases.build_hf(family, root)
    out[family] = (directory, hf_import.import_hf(str(directory),
                                                  progress=False))
  return out


@pytest.mark.parametrize('family', ['llama', 'qwen2_tied', 'qwen3'])
def test_dense_round_trip(imported, family, tmp_path):
  source, (_, params, kwargs) = imported[family]
  out = hf_export.export_hf(kwargs, params, {}, to='dense',
                            out_dir=str(tmp_path / 'out'), progress=False)
  original = safetensors_io.ShardedCheckpoint(source)
  exported = safetensors_io.ShardedCheckpoint(out)
  assert exported.keys() == original.keys()
  for key in original.keys():
    np.testing.assert_array_equal(exported.get(key), original.get(key))
  config = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert config['rope_parameters']['rope_theta'] == config['rope_theta']
  np.testing.assert_allclose(logits.torch_logits(logits.load_hf(out)), logits.jax_logits(kwargs, params),
                             atol=1e-4, rtol=1e-4)


# Mistral: Llama attention without biases (the 'llama' case has them).
CASES = [
    ('mistral', 'smoe', 0, 'mixtral'),
    ('mistral', 'smoe', 0, 'qwen2_moe'),
    ('mistral', 'deepseek_v2', 1, 'qwen2_moe'),
    ('qwen2_tied', 'deepseek_v2', 1, 'qwen2_moe'),
    ('qwen2_tied', 'smoe', 0, 'qwen2_moe'),
]


@pytest.mark.parametrize('family,router,shared,target', CASES)
def test_upcycled_export_matches_transformers(imported, family, router,
                                              shared, target, tmp_path):
  _, (_, params, kwargs) = imported[family]
  moe = upcycle.upcycle(kwargs, params, router=router, num_experts=4,
                        top_k=2, shared_experts=shared, noise=0.05, seed=3)
  out = hf_export.export_hf(*moe, to=target, out_dir=str(tmp_path / target),
                            progress=False)
  assert json.loads((tmp_path / target / 'config.json').read_text())[
      'architectures'] == [{'mixtral': 'MixtralForCausalLM',
                            'qwen2_moe': 'Qwen2MoeForCausalLM'}[target]]
  np.testing.assert_allclose(logits.torch_logits(logits.load_hf(out)), logits.jax_logits(*moe), atol=1e-4,
                             rtol=1e-4)


def test_routers_a_class_cannot_hold_are_refused(imported, tmp_path):
  _, (_, params, kwargs) = imported['llama']
  moe = upcycle.upcycle(kwargs, params, router='sigmoid', num_experts=4,
                        top_k=2)
  with pytest.raises(hf_export.ExportError,
                     match='Mixtral routes softmax top-k.*glm4_moe'):
    hf_export.export_hf(*moe, to='mixtral', out_dir=str(tmp_path / 'a'))
  xmoe = upcycle.upcycle(kwargs, params, router='xmoe', num_experts=4,
                         top_k=2)
  with pytest.raises(hf_export.ExportError, match='no stock Hugging Face '
                     "class holds router 'xmoe'"):
    hf_export.export_hf(*xmoe, to='qwen2_moe', out_dir=str(tmp_path / 'b'))
  _, (_, qparams, qkwargs) = imported['qwen2_tied']
  qmoe = upcycle.upcycle(qkwargs, qparams, router='smoe', num_experts=4,
                         top_k=2)
  with pytest.raises(hf_export.ExportError, match='Mixtral attention has no '
                     'biases.*qwen2_moe'):
    hf_export.export_hf(*qmoe, to='mixtral', out_dir=str(tmp_path / 'c'))
  assert not list(tmp_path.iterdir())          # nothing partial written


def test_phi3_round_trip(tmp_path):
  # Phi-3's fused qkv_proj and gate_up_proj: split on import, fused again.
  _, source = hf_cases.build_hf('phi3', tmp_path)
  _, params, kwargs = hf_import.import_hf(str(source), progress=False)
  base = json.loads((source / 'config.json').read_text())
  out = hf_export.export_hf(kwargs, params, {}, to='phi3',
                            out_dir=str(tmp_path / 'out'), base_config=base,
                            progress=False)
  original = safetensors_io.ShardedCheckpoint(source)
  exported = safetensors_io.ShardedCheckpoint(out)
  assert exported.keys() == original.keys()
  for key in original.keys():
    np.testing.assert_array_equal(exported.get(key), original.get(key))
  np.testing.assert_allclose(logits.torch_logits(logits.load_hf(out)), logits.jax_logits(kwargs, params),
                             atol=1e-4, rtol=1e-4)
