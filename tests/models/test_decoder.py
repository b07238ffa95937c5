"""Tests of the decoder LM (moe_jax/models/decoder.py) against independent references."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.models import decoder as model_lib
from moe_jax.models import rope


def _naive_rope(x, rotate, base=10000.0):
  """Per-position, per-pair rotation written out with numpy loops."""
  b, s, h, dh = x.shape
  out = np.array(x, dtype=np.float64)
  half = rotate // 2
  for pos in range(s):
    for i in range(half):
      theta = pos * base ** (-i / half)
      a, c = x[:, pos, :, i], x[:, pos, :, i + half]
      out[:, pos, :, i] = a * math.cos(theta) - c * math.sin(theta)
      out[:, pos, :, i + half] = c * math.cos(theta) + a * math.sin(theta)
  return out


def test_partial_rope_matches_naive_rotation():
  x = np.random.default_rng(0).normal(size=(2, 5, 3, 10)).astype(np.float32)
  rotate = rope.rotary_dims(10, 0.5)
  assert rotate == 4   # 0.5 * 10 = 5 -> the even number below: 4
  got = rope.apply_partial_rope(jnp.asarray(x),
                                     jnp.broadcast_to(jnp.arange(5), (2, 5)),
                                     rotate)
  np.testing.assert_allclose(np.asarray(got), _naive_rope(x, rotate),
                             atol=1e-5, rtol=1e-5)


def test_rotary_dims_reference_sizes():
  # algorithms.md §6.1: 82 -> 40 rotated dims (154M), 128 -> 64 (660M).
  assert rope.rotary_dims(82, 0.5) == 40
  assert rope.rotary_dims(128, 0.5) == 64


def _smoe_154m():
  layers, d, experts, width = 16, 512, 66, 128
  s = math.sqrt(2 / layers)
  ffn = dict(d_model=d, num_experts=experts, top_k=8, expert_width=width,
             router='smoe', router_options={'init_std': s / math.sqrt(d)},
             w_in_std=s / math.sqrt(d), w_out_std=s / math.sqrt(experts * width))
  return model_lib.TransformerLM(vocab_size=8000, d_model=d, num_layers=layers,
                                 num_heads=4, head_dim=82, ffn=ffn)


def test_154m_parameter_count_matches_reference():
  shapes = jax.eval_shape(lambda: _smoe_154m().init(
      jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
  count = sum(x.size for x in jax.tree.leaves(shapes['params']))
  # Computed by hand from algorithms.md §6.1: embeddings 8000*512, output
  # 512*8000 + 8000, attention 16 * (512*328 + 512*656 + 328*512), experts
  # 16 * 66 * 2 * 512 * 128, routers 16 * 512 * 66, LayerNorms (2*16 + 1) * 1024.
  expected = (8000 * 512 + 512 * 8000 + 8000 + 16 * (512 * 328 * 3 + 512 * 328)
              + 16 * 66 * 2 * 512 * 128 + 16 * 512 * 66 + 33 * 1024)
  assert count == expected
  assert abs(count - 157.9e6) / 157.9e6 < 0.02   # LibMoE's logged total


def test_tiny_model_is_causal():
  ffn = dict(d_model=16, num_experts=4, top_k=2, expert_width=8,
             router='smoe', backend='blocked')
  model = model_lib.TransformerLM(vocab_size=32, d_model=16, num_layers=2,
                                  num_heads=2, head_dim=8, ffn=ffn)
  tokens = jnp.array([[1, 2, 3, 4, 5, 6]])
  variables = model.init(jax.random.PRNGKey(0), tokens)
  logits, aux = model.apply(variables, tokens)
  changed = tokens.at[0, 4:].set(jnp.array([30, 31]))
  logits2, _ = model.apply(variables, changed)
  assert logits.shape == (1, 6, 32) and len(aux) == 2
  np.testing.assert_allclose(logits[0, :4], logits2[0, :4], atol=1e-6)
  assert not np.allclose(logits[0, 4:], logits2[0, 4:])
