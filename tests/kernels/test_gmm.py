"""kernels_pallas.gmm in Pallas interpret mode on CPU.

gmm, tgmm and the custom VJP of grouped_matmul against the pure-jnp loop
references (gmm_reference, tgmm_reference) and against jax.lax.ragged_dot /
ragged_dot_general (the dense expansion on CPU), over an explicit shape grid:
empty groups, a single group, many small groups, rows past sum(group_sizes),
partial tiles in M, K and N, float32 and bfloat16. Small explicit tilings keep
interpret mode fast and put several tiles and group boundaries in every shape.
Also: the tile metadata against a Python enumeration, the tile table, junk
(nan) rows outside every group, the Triton lowering for CUDA (run on CPU), and
MoEBlock(backend='pallas') against backend='loop'.

Every expected value comes from a reference loop, ragged_dot or a Python
enumeration, never from the kernel.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import gmm as gmm_lib
from kernels_pallas.gmm import Tiling

# Interpret-mode kernel tests run one at a time (style.md §5).
pytestmark = pytest.mark.serial

ON_GPU = jax.default_backend() == 'gpu'
SMALL = Tiling(16, 16, 16)
# Float32 accumulation either way; only the summation order differs.
TOL_F32 = dict(atol=1e-5, rtol=1e-5)
# A bfloat16 output differs by at most one rounding (2^-8 relative).
TOL_BF16 = dict(atol=1e-2, rtol=1e-2)


# The loop references, jitted so that each shape compiles once.
gmm_reference = jax.jit(gmm_lib.gmm_reference,
                        static_argnames=('preferred_element_type',
                                         'transpose_rhs'))
tgmm_reference = jax.jit(gmm_lib.tgmm_reference,
                         static_argnames=('preferred_element_type',))


def tol(dtype) -> dict:
  return TOL_BF16 if jnp.dtype(dtype) == jnp.bfloat16 else TOL_F32


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  m: int
  k: int
  n: int
  group_sizes: tuple[int, ...]
  dtype: str = 'float32'
  tiling: Tiling = SMALL

  def inputs(self, seed: int = 0):
    """lhs [M, K], rhs [G, K, N], grad [M, N] with O(1) products."""
    dtype = jnp.dtype(self.dtype)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    g = len(self.group_sizes)
    lhs = jax.random.normal(k1, (self.m, self.k)) / np.sqrt(self.k)
    rhs = jax.random.normal(k2, (g, self.k, self.n))
    grad = jax.random.normal(k3, (self.m, self.n))
    sizes = jnp.asarray(self.group_sizes, jnp.int32)
    return lhs.astype(dtype), rhs.astype(dtype), grad.astype(dtype), sizes


CASES = [
    # Boundaries inside 16-row tiles, an empty group, M a tile multiple.
    Case('empty_group', 64, 32, 32, (10, 0, 20, 34)),
    # Partial tiles in M, K and N; 25 rows past sum(group_sizes).
    Case('partial_tail', 50, 20, 40, (7, 0, 13, 5)),
    Case('single_group', 37, 33, 17, (37,)),
    Case('all_empty', 40, 24, 16, (0, 0, 0)),
    # 28 groups of 0-20 rows, several per row tile, leading and trailing empty
    # groups; a K tile wider than K; an L2 swizzle group of 2 row tiles.
    Case('many_small', 100, 24, 24, (0,) + (3,) * 20 + (1, 2, 0, 5, 10, 20, 0),
         tiling=Tiling(16, 32, 16, group_m=2)),
    Case('bf16_partial_tail', 50, 20, 40, (7, 0, 13, 5), 'bfloat16'),
    # Row and column tiles of 32: bigger than N's remainder.
    Case('bf16_many_small', 72, 40, 40, (9, 0, 17, 1, 30, 2, 0, 13), 'bfloat16',
         tiling=Tiling(32, 16, 32)),
]


def ids(case: Case) -> str:
  return case.name


def ragged_tgmm(lhs, grad, group_sizes):
  """tgmm oracle: ragged_dot_general with the ragged contracting dimension."""
  dims = jax.lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(((0,), (0,)), ((), ())),
      lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
  return jax.lax.ragged_dot_general(lhs, grad, group_sizes, dims,
                                    preferred_element_type=jnp.float32)


@pytest.mark.parametrize('case', CASES, ids=ids)
def test_gmm(case):
  lhs, rhs, _, sizes = case.inputs()
  out = gmm_lib.gmm(lhs, rhs, sizes, tiling=case.tiling, interpret=True)
  assert out.shape == (case.m, case.n) and out.dtype == jnp.float32
  ref = gmm_reference(lhs, rhs, sizes)
  np.testing.assert_allclose(out, ref, **TOL_F32)
  rd = jax.lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=jnp.float32)
  np.testing.assert_allclose(out, rd, **TOL_F32)
  # Rows past sum(group_sizes) are exactly zero.
  np.testing.assert_array_equal(out[sum(case.group_sizes):], 0.0)


@pytest.mark.parametrize('case', CASES, ids=ids)
def test_tgmm(case):
  lhs, _, grad, sizes = case.inputs()
  out = gmm_lib.tgmm(lhs, grad, sizes, tiling=case.tiling, interpret=True)
  g = len(case.group_sizes)
  assert out.shape == (g, case.k, case.n) and out.dtype == jnp.float32
  ref = tgmm_reference(lhs, grad, sizes)
  np.testing.assert_allclose(out, ref, **TOL_F32)
  np.testing.assert_allclose(out, ragged_tgmm(lhs, grad, sizes), **TOL_F32)
  for e, size in enumerate(case.group_sizes):
    if size == 0:
      np.testing.assert_array_equal(out[e], 0.0)


@pytest.mark.parametrize('case', CASES, ids=ids)
def test_vjp(case):
  """Forward and both cotangents in the input dtype, against two oracles."""
  lhs, rhs, grad, sizes = case.inputs()
  dtype = lhs.dtype

  def kernel(l, r):
    return gmm_lib.grouped_matmul(l, r, sizes, tiling=case.tiling,
                                  interpret=True)

  def reference(l, r):
    return gmm_reference(l, r, sizes, preferred_element_type=dtype)

  def ragged(l, r):
    return jax.lax.ragged_dot(l, r, sizes,
                              preferred_element_type=jnp.float32).astype(dtype)

  out, vjp = jax.vjp(kernel, lhs, rhs)
  dlhs, drhs = vjp(grad)
  assert out.dtype == dlhs.dtype == drhs.dtype == dtype
  for oracle in (reference, ragged):
    ref_out, ref_vjp = jax.vjp(oracle, lhs, rhs)
    ref_dlhs, ref_drhs = ref_vjp(grad)
    for got, want in ((out, ref_out), (dlhs, ref_dlhs), (drhs, ref_drhs)):
      np.testing.assert_allclose(got.astype(jnp.float32),
                                 want.astype(jnp.float32), **tol(dtype))
  if sum(case.group_sizes):
    assert float(jnp.abs(drhs.astype(jnp.float32)).max()) > 0.1


def test_junk_rows_outside_groups():
  """nan / inf rows past the groups change nothing (dispatch leaves junk)."""
  case = dataclasses.replace(CASES[1], group_sizes=(6, 0, 11, 9))
  lhs, rhs, grad, sizes = case.inputs(seed=1)
  used = sum(case.group_sizes)
  lhs = lhs.at[used:].set(jnp.nan).at[used + 1].set(jnp.inf)
  grad = grad.at[used:].set(jnp.nan)
  out = gmm_lib.gmm(lhs, rhs, sizes, tiling=SMALL, interpret=True)
  np.testing.assert_allclose(out[:used], gmm_reference(
      lhs[:used], rhs, sizes), **TOL_F32)
  np.testing.assert_array_equal(out[used:], 0.0)
  dw = gmm_lib.tgmm(lhs, grad, sizes, tiling=SMALL, interpret=True)
  np.testing.assert_allclose(dw, tgmm_reference(
      lhs[:used], grad[:used], sizes), **TOL_F32)


def test_mixed_dtypes_and_output_dtype():
  """bf16 lhs with f32 rhs computes in f32; preferred_element_type sets out."""
  case = dataclasses.replace(CASES[1], group_sizes=(13, 0, 27, 3))
  lhs, rhs, _, sizes = case.inputs(seed=2)
  lhs = lhs.astype(jnp.bfloat16)
  out = gmm_lib.gmm(lhs, rhs, sizes, tiling=SMALL, interpret=True,
                    preferred_element_type=jnp.bfloat16)
  assert out.dtype == jnp.bfloat16
  ref = gmm_reference(lhs.astype(jnp.float32), rhs, sizes)
  np.testing.assert_allclose(out.astype(jnp.float32), ref, **TOL_BF16)


def expected_tiles(group_sizes, m, block_m):
  """(group, row tile) pairs by enumeration; group G is the tail."""
  pairs, start = [], 0
  bounds = []
  for size in group_sizes:
    bounds.append((start, min(start + size, m)))
    start = min(start + size, m)
  bounds.append((start, m))
  for g, (lo, hi) in enumerate(bounds):
    pairs += [(g, b) for b in range(lo // block_m, -(-hi // block_m))
              if hi > lo]
  return pairs


@pytest.mark.parametrize('group_sizes,m,block_m', [
    ((10, 0, 20, 34), 64, 16),
    ((7, 0, 13, 5), 50, 16),
    ((0, 0, 0), 40, 16),
    ((3,) * 20 + (1, 2, 0, 5, 10, 20), 100, 16),
    ((1,) * 9, 9, 128),
    ((64, 64), 128, 64),
    ((5, 200), 100, 32),   # sizes past M are clipped to M
])
def test_group_metadata(group_sizes, m, block_m):
  meta = gmm_lib.make_group_metadata(jnp.asarray(group_sizes, jnp.int32), m,
                                     block_m)
  want = expected_tiles(group_sizes, m, block_m)
  used = int(meta.num_tiles[0])
  got = list(zip(np.asarray(meta.tile_group[:used]).tolist(),
                 np.asarray(meta.tile_block[:used]).tolist()))
  assert got == want
  assert used <= gmm_lib.num_grid_tiles(m, len(group_sizes), block_m)
  assert meta.tile_group.shape == (
      gmm_lib.num_grid_tiles(m, len(group_sizes), block_m),)


def test_choose_tiling():
  mixtral = gmm_lib.choose_tiling(8192, 4096, 14336, jnp.bfloat16,
                                  num_groups=8)
  assert (mixtral.block_m, mixtral.block_k, mixtral.block_n) == (128, 64, 256)
  fine = gmm_lib.choose_tiling(131072, 7168, 2048, jnp.bfloat16,
                               num_groups=256)
  assert fine.block_m == 128
  small_groups = gmm_lib.choose_tiling(2048, 2048, 768, jnp.bfloat16,
                                       num_groups=64)
  assert small_groups.block_m == 64
  tiny = gmm_lib.choose_tiling(24, 16, 8, jnp.float32, num_groups=4)
  assert (tiny.block_m, tiny.block_k, tiny.block_n) == (32, 16, 16)
  for op in ('gmm', 'tgmm'):
    for shape in ((8192, 4096, 14336), (131072, 512, 7168), (100, 33, 17)):
      for dtype in (jnp.bfloat16, jnp.float32):
        t = gmm_lib.choose_tiling(*shape, dtype, num_groups=8, op=op)
        rows = t.block_m * t.block_k
        cols = (t.block_k if op == 'gmm' else t.block_m) * t.block_n
        smem = (rows + cols) * jnp.dtype(dtype).itemsize * t.num_stages
        assert smem <= 160 * 1024, (op, shape, dtype, t)
  with pytest.raises(ValueError, match='block_k'):
    Tiling(16, 24, 16)


def test_default_tiling_and_interpret_logged_once(caplog, monkeypatch):
  """No GPU: interpret mode by default, said once; tiles from the table."""
  monkeypatch.setattr(gmm_lib, '_interpret_logged', False)
  case = Case('default', 24, 16, 8, (5, 0, 19))
  lhs, rhs, grad, sizes = case.inputs(seed=3)
  with caplog.at_level(logging.WARNING, logger='kernels_pallas.gmm'):
    out = gmm_lib.gmm(lhs, rhs, sizes)
    dw = gmm_lib.tgmm(lhs, grad, sizes)
  np.testing.assert_allclose(out, gmm_reference(lhs, rhs, sizes),
                             **TOL_F32)
  np.testing.assert_allclose(dw, tgmm_reference(lhs, grad, sizes),
                             **TOL_F32)
  notes = [r for r in caplog.records if 'interpret mode' in r.getMessage()]
  assert len(notes) == (0 if ON_GPU else 1)


def test_validation_errors():
  lhs = jnp.zeros((8, 4))
  with pytest.raises(ValueError, match='contraction'):
    gmm_lib.gmm(lhs, jnp.zeros((2, 5, 3)), jnp.zeros((2,), jnp.int32),
                interpret=True)
  with pytest.raises(ValueError, match='group_sizes'):
    gmm_lib.gmm(lhs, jnp.zeros((2, 4, 3)), jnp.zeros((3,), jnp.int32),
                interpret=True)
  with pytest.raises(ValueError, match='integer'):
    gmm_lib.tgmm(lhs, jnp.zeros((8, 3)), jnp.zeros((2,)), interpret=True)


def test_lowers_to_triton_for_cuda():
  """The GPU path (interpret=False) lowers to Triton on a CPU-only machine.

  Exporting for the 'cuda' platform runs the Pallas Triton lowering of the
  H100 tile table (bf16 Mixtral-like shape); compiling the Triton IR to a
  cubin and running it needs a GPU.
  """
  s = jax.ShapeDtypeStruct
  m, k, n, g = 8192, 4096, 14336, 8
  sizes = s((g,), jnp.int32)

  def train(l, r, gs):
    loss = lambda l, r: gmm_lib.grouped_matmul(
        l, r, gs, interpret=False).astype(jnp.float32).sum()
    return jax.value_and_grad(loss, argnums=(0, 1))(l, r)

  exported = jax.export.export(
      jax.jit(train), platforms=['cuda'],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(
          '__gpu$xla.gpu.triton')])(
              s((m, k), jnp.bfloat16), s((g, k, n), jnp.bfloat16), sizes)
  text = exported.mlir_module()
  # Forward gmm, dlhs gmm (transposed rhs) and tgmm.
  assert text.count('__gpu$xla.gpu.triton') == 3
  for name in ('moe_gmm', 'moe_tgmm'):
    assert name in text


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason='needs a GPU')
@pytest.mark.parametrize('case', CASES, ids=ids)
def test_compiled_on_gpu(case):
  """The compiled Triton kernels (default H100 tiles) against the references."""
  lhs, rhs, grad, sizes = case.inputs()
  dtype = lhs.dtype
  out, vjp = jax.vjp(lambda l, r: gmm_lib.grouped_matmul(l, r, sizes), lhs,
                     rhs)
  dlhs, drhs = vjp(grad)
  ref_out, ref_vjp = jax.vjp(
      lambda l, r: gmm_reference(l, r, sizes, preferred_element_type=dtype),
      lhs, rhs)
  ref_dlhs, ref_drhs = ref_vjp(grad)
  for got, want in ((out, ref_out), (dlhs, ref_dlhs), (drhs, ref_drhs)):
    np.testing.assert_allclose(got.astype(jnp.float32),
                               want.astype(jnp.float32), **tol(dtype))


@pytest.mark.parametrize('router', ['smoe', 'tc_moe'])
def test_moe_block_pallas_matches_loop(router):
  """MoEBlock(backend='pallas') output and gradients equal backend='loop'."""
  from moe_jax.moe.layer import MoEBlock

  x = jax.random.normal(jax.random.PRNGKey(4), (2, 6, 16))
  kwargs = dict(d_model=16, num_experts=4, top_k=2, expert_width=8,
                router=router)
  # jit: an eager flax init dispatches op by op (seconds on CPU).
  params = jax.jit(MoEBlock(backend='loop', **kwargs).init)(
      jax.random.PRNGKey(5), x)
  ct = jax.random.normal(jax.random.PRNGKey(6), x.shape)

  def run(backend):
    block = MoEBlock(backend=backend, **kwargs)

    def loss(p, x):
      y, _ = block.apply(p, x)
      return jnp.sum(y * ct), y

    (_, y), grads = jax.jit(jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True))(params, x)
    return y, grads

  y_ref, g_ref = run('loop')
  y, g = run('pallas')
  np.testing.assert_allclose(y, y_ref, **TOL_F32)
  flat, flat_ref = jax.tree.leaves(g), jax.tree.leaves(g_ref)
  assert len(flat) == len(flat_ref)
  for a, b in zip(flat, flat_ref):
    np.testing.assert_allclose(a, b, **TOL_F32)
  # Not vacuous: experts and router receive gradient.
  expert_grads = jax.tree.leaves(g_ref[0]['params']['experts'])
  assert all(float(jnp.abs(leaf).max()) > 1e-4 for leaf in expert_grads)
  router_grads = jax.tree.leaves(g_ref[0]['params']['router'])
  assert any(float(jnp.abs(leaf).max()) > 1e-6 for leaf in router_grads)
