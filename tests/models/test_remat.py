"""Activation rematerialisation (train.remat) changes memory, not numbers.

Every policy of decoder.REMAT_POLICIES must give the loss and gradients of
remat='none' (float32, 1e-6) on the tiny model, with the same parameter tree
(checkpoints written without remat must load with it). One jit compile per
policy, B 2, S 16.
"""

import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config_lib
from moe_jax import models
from moe_jax.models import decoder

B, S = 2, 16
CONFIGS = pathlib.Path(__file__).resolve().parents[2] / 'configs'


def _model(router: str = 'smoe', **moe_overrides):
  config = config_lib.load_config(f'{CONFIGS}/{router}_154m.py:tiny')
  config.train.dtype = 'float32'
  with config.unlocked():
    for name, value in moe_overrides.items():
      config.moe.router_options[name] = value
  return config, models.build(config)


def _tokens(vocab: int):
  rng = np.random.default_rng(0)
  return jnp.asarray(rng.integers(0, vocab, (B, S + 1)), jnp.int32)


def _loss(params, variables, tokens, *, model):
  """CE + Σ balance-style aux losses in train mode (router rng and step)."""
  logits, auxes = model.apply({**variables, 'params': params}, tokens[:, :-1],
                              train=True, step=jnp.int32(3),
                              rngs={'router': jax.random.key(7)})
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  ce = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
  aux = sum(jnp.sum(v) for a in auxes for v in a['losses'].values())
  return ce + 0.01 * aux


def _init(model, tokens):
  return nn.unbox(jax.jit(model.init)(jax.random.key(0), tokens))


def _loss_and_grads(model, variables, tokens):
  fn = jax.jit(jax.value_and_grad(functools.partial(_loss, model=model)))
  return fn(variables['params'], variables, tokens)


@pytest.fixture(scope='module')
def reference():
  # MoE++: each layer's router logits feed the next (prev_logits), and
  # copy / constant experts run beside the routed ones. Expert dropout makes
  # the train-mode router draw from the 'router' rng: the remat'd layers
  # must see the same stream.
  config, model = _model('moe_plus_plus', expert_dropout=0.1)
  tokens = _tokens(config.model.vocab_size)
  variables = _init(model, tokens[:, :-1])
  return model, variables, tokens, _loss_and_grads(model, variables, tokens)


@pytest.mark.parametrize(
    'policy', [p for p in decoder.REMAT_POLICIES if p != 'none'])
def test_policy_matches_no_remat(reference, policy):
  model, variables, tokens, (loss, grads) = reference
  got_loss, got_grads = _loss_and_grads(model.clone(remat=policy), variables,
                                        tokens)
  np.testing.assert_allclose(got_loss, loss, rtol=1e-6, atol=1e-6)
  assert jax.tree.structure(got_grads) == jax.tree.structure(grads)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    np.testing.assert_allclose(
        _at(got_grads, path), g, rtol=1e-6, atol=1e-6,
        err_msg=jax.tree_util.keystr(path))


def _at(tree, path):
  for key in path:
    tree = tree[key.key]
  return tree


@pytest.mark.parametrize('policy', ['full', 'save_qkv_proj'])
def test_parameter_tree_is_unchanged(policy):
  config, model = _model()
  tokens = _tokens(config.model.vocab_size)[:, :-1]
  shapes = lambda m: jax.eval_shape(m.init, jax.random.key(0), tokens)
  plain, remat = shapes(model), shapes(model.clone(remat=policy))
  # Same paths (layer_i/attention/query/kernel, ...), shapes, dtypes and
  # logical partitioning boxes.
  assert remat == plain
  assert set(plain['params']) == {'embedding', 'layer_0', 'layer_1',
                                  'ln_final', 'output'}


def test_unknown_policy_names_the_config_field():
  config = config_lib.load_config(f'{CONFIGS}/smoe_154m.py:tiny')
  with config.unlocked():
    config.train.remat = 'everything'
  with pytest.raises(ValueError, match=r"train\.remat: expected one of "
                     r"\('none', 'full', 'save_dots'.*got 'everything'"):
    models.build(config)
