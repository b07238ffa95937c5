"""Registers the Pallas grouped matmul as the expert backend 'pallas'.

Imported lazily by moe_jax.moe.experts.get_backend('pallas'). The backend's
gmm(x [R, D], w [E, D, F], group_sizes [E]) -> [R, F] is differentiable in x
and w (custom VJP: dlhs = gmm(grad, w^T), dw = tgmm(x, grad)), returns x's
dtype with float32 accumulation, and needs no row padding: the kernel masks
group boundaries inside a tile, so row_alignment = row_multiple = 1. Rows past
sum(group_sizes) come out as 0. Without a GPU it runs in Pallas interpret mode
and logs that once.

Dimension legend: R dispatched rows, D input width, F output width, E experts.
"""

from __future__ import annotations

import jax

from kernels_pallas import gmm as gmm_lib
from moe_jax.moe import experts


def gmm_backend(x: jax.Array, w: jax.Array,
                group_sizes: jax.Array) -> jax.Array:
  """x [R, D], w [E, D, F], group_sizes [E] -> [R, F] in x.dtype."""
  return gmm_lib.grouped_matmul(x, w, group_sizes,
                                preferred_element_type=x.dtype)


BACKEND = experts.Backend(gmm=gmm_backend, row_alignment=1, row_multiple=1)

experts.register_backend('pallas', BACKEND)
