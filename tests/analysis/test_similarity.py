"""Expert similarity: golden ANI / CKA values, and the layer-input capture
checked against flax's own record of each layer's pre-norm output."""

import math
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import config_lib
from moe_jax import models
from moe_jax.analysis import similarity

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_ani_hand_values():
  # Cosines: (0, 1) 0, (0, 2) and (1, 2) 1/sqrt(2): mean sqrt(2)/3.
  rows = np.array([[1., 0.], [0., 1.], [1., 1.]])
  assert similarity.ani(rows) == pytest.approx(math.sqrt(2) / 3)
  with pytest.raises(ValueError, match='at least 2'):
    similarity.ani(rows[:1])


def test_hidden_units_and_router_rows():
  # E = 2, D = 2, F = 2: expert 0's input columns e0, e1; expert 1's e0, -e1.
  w_in = np.array([[[1., 0.], [0., 1.]], [[1., 0.], [0., -1.]]])
  w_out = np.transpose(w_in, (0, 2, 1))
  units = similarity.hidden_unit_rows({'w_in': w_in, 'w_out': w_out})
  np.testing.assert_array_equal(units['w_in'],
                                [[1, 0], [0, 1], [1, 0], [0, -1]])
  # Pairs: 6; cosines 0, 1, 0, 0, -1, 0 -> mean 0.
  assert similarity.ani(units['w_in']) == pytest.approx(0.0)
  router = {'w': np.array([[1., 2., 9.], [0., 0., 9.]])}   # D = 2, E' = 3
  np.testing.assert_array_equal(
      similarity.router_expert_rows(router, 2), [[1, 0], [2, 0]])
  assert similarity.router_expert_rows({'embedding': 0}, 2) is None


def test_swiglu_hidden_unit_is_its_gate_and_up_columns():
  # E = 1, D = 2, F = 2: W_in = [W_gate | W_up], columns g0, g1, u0, u1.
  g = np.array([[1., 2.], [3., 4.]])
  u = np.array([[5., 6.], [7., 8.]])
  w_in = np.concatenate([g, u], axis=1)[None]                   # [1, 2, 4]
  w_out = np.zeros((1, 2, 2))
  units = similarity.hidden_unit_rows({'w_in': w_in, 'w_out': w_out})
  # Unit j = (g[:, j], u[:, j]).
  np.testing.assert_array_equal(units['w_in'], [[1, 3, 5, 7], [2, 4, 6, 8]])
  assert units['w_out'].shape == (2, 2)


def test_linear_cka_hand_value_and_invariances():
  # Centred x = [-1, 0, 1], y = [0, -1, 1]: (x.y)^2 / (|x|^2 |y|^2) = 1/4.
  x = np.array([[1.], [2.], [3.]])
  y = np.array([[1.], [0.], [2.]])
  assert similarity.linear_cka(x, y) == pytest.approx(0.25)
  rng = np.random.default_rng(0)
  a = rng.standard_normal((50, 4))
  q, _ = np.linalg.qr(rng.standard_normal((4, 4)))
  assert similarity.linear_cka(a, 3.0 * a @ q + 1.0) == pytest.approx(1.0)
  assert similarity.linear_cka(a, rng.standard_normal((50, 4))) < 0.3


def test_output_cka_of_identical_and_different_experts():
  rng = np.random.default_rng(1)
  w_in = rng.standard_normal((3, 4, 5)).astype(np.float32)
  w_out = rng.standard_normal((3, 5, 4)).astype(np.float32)
  w_in[1], w_out[1] = w_in[0], w_out[0]       # expert 1 is a copy of 0
  x = rng.standard_normal((64, 4)).astype(np.float32)
  outputs = similarity.expert_outputs({'w_in': w_in, 'w_out': w_out}, x,
                                      'relu')
  np.testing.assert_allclose(outputs[2], np.maximum(x @ w_in[2], 0) @ w_out[2],
                             rtol=1e-5, atol=1e-5)
  cka = similarity.output_cka(outputs)
  assert cka[0, 1] == pytest.approx(1.0)
  assert cka[0, 2] < 0.99
  np.testing.assert_allclose(cka, cka.T)


def test_moe_layer_inputs_are_the_pre_norm_outputs():
  config = config_lib.load_config(f'{REPO}/configs/smoe_154m.py:tiny')
  model = models.build(config)
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
  variables = nn.unbox(jax.jit(lambda k: model.init(k, tokens))(
      jax.random.key(0)))
  inputs = similarity.moe_layer_inputs(model, variables, np.asarray(tokens))
  # Both jitted, so both see the same XLA fusion (bitwise-equal rounding).
  _, state = jax.jit(lambda v, t: model.apply(
      v, t, capture_intermediates=True, mutable=['intermediates']))(
          variables, tokens)
  assert len(inputs) == config.model.num_layers
  for i, x in enumerate(inputs):
    expected = state['intermediates'][f'layer_{i}']['ln2']['__call__'][0]
    np.testing.assert_allclose(x, np.asarray(expected).reshape(16, -1),
                               rtol=1e-6)
  frame, cka = similarity.layer_similarity(
      variables['params'], inputs, num_experts=config.moe.num_experts,
      activation=config.moe.activation)
  assert list(frame['layer']) == list(range(config.model.num_layers))
  assert cka.shape == (config.model.num_layers,) + (config.moe.num_experts,) * 2
  # Layer 1 by hand with numpy: router rows W[:, e] and W_out hidden rows.
  moe = variables['params']['layer_1']['moe']
  def mean_off_diagonal_cosine(rows):
    rows = np.asarray(rows, np.float64)
    n = len(rows)
    total = sum(rows[i] @ rows[j] / np.linalg.norm(rows[i]) /
                np.linalg.norm(rows[j])
                for i in range(n) for j in range(n) if i != j)
    return total / (n * (n - 1))
  w = np.asarray(moe['router']['router']['w'])
  assert frame.ani_router[1] == pytest.approx(
      mean_off_diagonal_cosine(w.T[:config.moe.num_experts]), rel=1e-6)
  w_out = np.asarray(moe['experts']['w_out'])
  assert frame.ani_w_out[1] == pytest.approx(
      mean_off_diagonal_cosine(w_out.reshape(-1, w_out.shape[-1])), rel=1e-6,
      abs=1e-9)
