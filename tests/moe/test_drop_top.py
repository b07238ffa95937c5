"""DropTop-n (algorithms.md §9): remove each token's top slot(s), renormalise.

The layer with `router_options.drop_top` against the naive reference
(tests/moe/naive_moe.py drops the first-ranked slots of its own per-token
routing and rescales by hand), outputs and every gradient; plus the slot
transform on hand-computed values.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.moe import router as router_lib
from moe_jax.moe.routers import base
from tests.moe import test_layer_parity as parity

_MOEPP = dict(n_const=2, n_copy=1, n_zero=1)

CASES = {
    'smoe_k3_drop1': parity.Case('smoe', num_experts=5, top_k=3,
                                 options=dict(drop_top=1)),
    # DropTop-1&2 with k = 3: one expert remains, with weight 1, so the
    # router gets no gradient through the weights.
    'smoe_k3_drop2': parity.Case('smoe', num_experts=5, top_k=3,
                                 options=dict(drop_top=2), router_grad=False),
    # Special slots are removed like FFN slots when they rank first.
    'moe_plus_plus_drop1': parity.Case(
        'moe_plus_plus', top_k=3, options=dict(_MOEPP, drop_top=1),
        prev_logits=True,
        check=parity._check_slot_kinds('ffn', 'const', 'copy')),  # pylint: disable=protected-access
    # Signed weights and null slots.
    'tc_moe_drop1': parity.Case(
        'tc_moe', top_k=3, options=dict(num_null=3, tc_neg_offset=-0.5,
                                        tc_null_offset=0.5, drop_top=1),
        seed=1, check=parity._check_slot_kinds('pos', 'neg', 'null')),  # pylint: disable=protected-access
    # No renormalisation in the router; fewer active slots than the budget.
    'remoe_drop1': parity.Case('remoe', num_experts=5,
                               options=dict(drop_top=1)),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_drop_top_matches_naive(name):
  parity.check_case(CASES[name], 'blocked')


def test_drop_top_changes_the_output():
  """The comparison above is not vacuous: dropping changes y."""
  case = CASES['smoe_k3_drop1']
  y_drop = parity.naive_cached(case)[0]
  y_full = parity.naive_fn(case, case.spec(options=()))[0]
  assert float(jnp.max(jnp.abs(y_drop - y_full))) > 1e-2


def test_drop_top_slots_hand_values():
  choice = jnp.array([[3, 1, 0], [2, 0, -1], [4, -1, -1]], jnp.int32)
  weight = jnp.array([[0.5, 0.3, 0.2], [0.6, 0.4, 0.0], [1.0, 0.0, 0.0]])
  new_choice, new_weight = base.drop_top_slots(choice, weight, 1)
  np.testing.assert_array_equal(
      new_choice, [[-1, 1, 0], [-1, 0, -1], [-1, -1, -1]])
  # Row 0: 0.3 / 0.5 and 0.2 / 0.5; row 1: 0.4 / 0.4; row 2: nothing left.
  np.testing.assert_allclose(new_weight, [[0.0, 0.6, 0.4], [0.0, 1.0, 0.0],
                                          [0.0, 0.0, 0.0]], rtol=1e-6)
  # TC-MoE signs: |w| mass 1.0 kept; -0.2 and 0.3 scaled by 1 / 0.5.
  signed_c, signed_w = base.drop_top_slots(
      jnp.array([[0, 5, 2]]), jnp.array([[0.5, -0.2, 0.3]]), 1)
  np.testing.assert_array_equal(signed_c, [[-1, 5, 2]])
  np.testing.assert_allclose(signed_w, [[0.0, -0.4, 0.6]], rtol=1e-6)


def test_drop_top_must_leave_a_slot():
  with pytest.raises(ValueError, match='drop_top'):
    router_lib.make_config('smoe', num_experts=4, top_k=2, d_model=8,
                           drop_top=2)
