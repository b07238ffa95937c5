"""VisionTower pieces against torch: activations, resizes, S², the MoE tower.

The references are torch itself (F.interpolate, transformers' QuickGELU) and
an independent torch transcription of s2wrapper's `forward` (Shi et al.
2024); HF-parity of whole towers is in tests/convert/test_vision_import.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.models import vision
from moe_jax.moe import activations

torch = pytest.importorskip('torch')
F = torch.nn.functional


def test_quick_gelu_matches_transformers():
  act = pytest.importorskip('transformers.activations')
  x = np.linspace(-6, 6, 101, dtype=np.float32)
  want = act.ACT2FN['quick_gelu'](torch.from_numpy(x)).numpy()
  got = np.asarray(activations.apply_activation(jnp.asarray(x), 'quick_gelu'))
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
  assert 'quick_gelu' in activations.ACTIVATIONS


@pytest.mark.parametrize('size_in,size_out', [((4, 4), (6, 5)),
                                              ((4, 4), (12, 12)),
                                              ((7, 9), (3, 4)),
                                              ((5, 5), (5, 5))])
def test_bicubic_resize_matches_torch(size_in, size_out):
  x = np.random.default_rng(0).normal(size=(2, *size_in, 3)).astype(
      np.float32)
  want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2),
                       size=size_out, mode='bicubic',
                       align_corners=False).permute(0, 2, 3, 1).numpy()
  got = vision.resize_2d(jnp.asarray(x), size_out, 'bicubic')
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


@pytest.mark.parametrize('size_in,size_out', [((12, 12), (4, 4)),
                                              ((9, 6), (3, 3)),
                                              ((7, 5), (3, 2))])
def test_area_resize_matches_torch(size_in, size_out):
  x = np.random.default_rng(1).normal(size=(2, *size_in, 3)).astype(
      np.float32)
  want = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2),
                       size=size_out, mode='area').permute(0, 2, 3, 1).numpy()
  got = vision.resize_2d(jnp.asarray(x), size_out, 'area')
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


# ------------------------------------------------------------------- S² ---

PATCH = 4


def _torch_s2(model, x, scales):
  """s2wrapper.forward (num_prefix_token=0, output 'bnc'), NCHW, in torch."""
  b, _, size, _ = x.shape
  outs = []
  for scale in scales:
    img = F.interpolate(x, size=size * scale, mode='bicubic')
    # split_chessboard: crops concatenated crop-major on the batch.
    crops = torch.cat([img[:, :, i * size:(i + 1) * size,
                           j * size:(j + 1) * size]
                       for i in range(scale) for j in range(scale)], dim=0)
    out = model(crops)                                       # [s²B, N, D]
    side = int(out.shape[1] ** 0.5)
    out = out.reshape(out.shape[0], side, side, -1).permute(0, 3, 1, 2)
    # merge_chessboard.
    out = torch.cat([torch.cat([out[(i * scale + j) * b:(i * scale + j + 1) * b]
                                for j in range(scale)], dim=-1)
                     for i in range(scale)], dim=-2)
    outs.append(out)
    # outs[0]'s grid is the output size (resize_output_to_idx=0).
  size0 = outs[0].shape[-2]
  out = torch.cat([F.interpolate(o, size=size0, mode='area') for o in outs],
                  dim=1)
  return out.flatten(2).transpose(1, 2)                      # [B, N, D S]


@pytest.mark.parametrize('scales', [(1, 3), (1, 2, 3)])
def test_multiscale_matches_s2wrapper(scales):
  rng = np.random.default_rng(2)
  b, size, c, d = 2, 16, 3, 5
  pixels = rng.normal(size=(b, size, size, c)).astype(np.float32)
  w = rng.normal(size=(PATCH * PATCH * c, d)).astype(np.float32)

  def jax_fn(crops):                                         # NHWC
    n = crops.shape[0]
    g = size // PATCH
    p = crops.reshape(n, g, PATCH, g, PATCH, c).transpose(0, 1, 3, 2, 4, 5)
    feats = p.reshape(n, g * g, -1) @ jnp.asarray(w)
    return feats, [('call', n)]

  def torch_fn(crops):                                       # NCHW
    n = crops.shape[0]
    g = size // PATCH
    p = crops.permute(0, 2, 3, 1).reshape(n, g, PATCH, g, PATCH, c)
    return p.permute(0, 1, 3, 2, 4, 5).reshape(n, g * g, -1) @ (
        torch.from_numpy(w))

  got, auxes = vision.multiscale_features(jax_fn, jnp.asarray(pixels),
                                          scales)
  want = _torch_s2(torch_fn, torch.from_numpy(pixels).permute(0, 3, 1, 2),
                   scales).numpy()
  assert got.shape == (b, (size // PATCH) ** 2, d * len(scales))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  assert auxes == [('call', s * s * b) for s in scales]


def test_multiscale_refuses_class_token_rows():
  fn = lambda crops: (jnp.zeros((crops.shape[0], 17, 4)), [])
  with pytest.raises(ValueError, match='features_fn'):
    vision.multiscale_features(fn, jnp.zeros((1, 16, 16, 3)), (1, 2))


# ------------------------------------------------------------- the tower ---

TINY = dict(kind='siglip', image_size=16, patch_size=4, d_model=16,
            num_layers=3, num_heads=2, mlp_width=32, activation='gelu_tanh',
            norm_eps=1e-6)


def test_moe_tower_builds_and_returns_one_aux_per_layer():
  e, k = 4, 2
  ffn = dict(d_model=16, num_experts=e, top_k=k, expert_width=32,
             router='smoe', activation='gelu_tanh', expert_bias=True)
  tower = vision.VisionTower(**dict(TINY, num_layers=2), dense_ffn=False,
                             ffn=ffn)
  pixels = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  # One compile for parameters and forward (MoE blocks compile slowly).
  (feats, auxes), variables = jax.jit(tower.init_with_output)(
      jax.random.key(1), pixels)
  params = nn.unbox(variables)['params']
  experts = params['layer_0']['moe']['experts']
  assert experts['w_in'].shape == (e, 16, 32)
  assert experts['b_out'].shape == (e, 16)
  assert 'router' in params['layer_1']['moe']
  assert feats.shape == (2, 16, 16)
  assert len(auxes) == 2
  assert all({'losses', 'metrics', 'router_logits'} <= set(a)
             for a in auxes)
  assert np.all(np.isfinite(np.asarray(feats)))


def test_dense_tower_tree_and_no_auxes():
  tower = vision.VisionTower(**dict(TINY, kind='clip'))
  pixels = jnp.zeros((1, 16, 16, 3))
  (feats, auxes), variables = jax.jit(tower.init_with_output)(
      jax.random.key(0), pixels)
  params = nn.unbox(variables)['params']
  assert params['layer_0']['ffn']['ffn']['w_in'].shape == (16, 32)
  assert params['embeddings']['position'].shape == (17, 16)
  assert params['embeddings']['class_token'].shape == (16,)
  assert 'bias' not in params['embeddings']['patch']   # CLIP's conv has none
  assert set(params) >= {'pre_ln', 'post_ln'}
  assert feats.shape == (1, 16, 16) and auxes == []


def test_tower_kwargs_from_a_diff_saved_config():
  # llava-1.5's nested vision_config stores only non-default fields.
  kwargs = vision.tower_kwargs_from_hf(dict(
      model_type='clip_vision_model', hidden_size=1024, image_size=336,
      intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
      patch_size=14, projection_dim=768))
  assert kwargs == dict(kind='clip', image_size=336, patch_size=14,
                        num_channels=3, d_model=1024, num_layers=24,
                        num_heads=16, mlp_width=4096, activation='quick_gelu',
                        norm_eps=1e-5)
  siglip = vision.tower_kwargs_from_hf(dict(model_type='siglip_vision_model'))
  assert siglip['activation'] == 'gelu_tanh' and siglip['norm_eps'] == 1e-6
  with pytest.raises(ValueError, match='vision_config.model_type'):
    vision.tower_kwargs_from_hf(dict(model_type='vit'))


def test_bad_fields_are_named():
  pixels = jnp.zeros((1, 16, 16, 3))
  with pytest.raises(ValueError, match='feature_select'):
    vision.VisionTower(**TINY, feature_select='cls').init(
        jax.random.key(0), pixels)
  with pytest.raises(ValueError, match='feature_layer'):
    vision.VisionTower(**TINY, feature_layer=-5).init(jax.random.key(0),
                                                       pixels)
