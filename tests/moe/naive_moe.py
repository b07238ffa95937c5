"""A naive, per-token Mixture-of-Experts reference for the layer parity tests.

Written from the math of algorithms.md §2-§3 (the "moe_jax:" bullets), with no
call into moe_jax: one Python loop over tokens, and for every token a loop
over its selected slots that runs the selected expert's MLP directly
(x @ W_in[e] -> act -> @ W_out[e]) and adds it with its routing weight.

Routing decisions (which experts a token picks) are piecewise constant in the
inputs, so the reference works in two steps:

  plan = naive_plan(params, state, x, spec)        concrete values -> ids
  y = naive_moe(params, state, x, spec, plan)       differentiable in params, x

`plan` holds only Python ints, so `jax.grad` of the second pass differentiates
the weights and the experts with the selection held fixed, which is the
gradient of the layer wherever no two scores tie.

Parameters are read from the Flax variables of `MoEBlock` (unboxed):
  params/router/router/{w, b, embed, embedding, gate_map, w_out}
  params/experts/{w_in, w_out, b_in, b_out}, params/shared/{...},
  params/constant/{gate, value}; router_state/router/router/{bias, hyper_*}.
All matrices are stored input-dimension first: z = x @ w.

Dimension legend: B batch, S sequence, T = B*S tokens, D model width,
E routed FFN experts, E' router width, K slots, F expert width.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erf

# Renormalisation epsilon of the LM stack (algorithms.md §0).
EPS = 1e-20


@dataclasses.dataclass(frozen=True)
class Spec:
  """What the naive layer computes: the MoEBlock fields it needs."""

  router: str
  num_experts: int
  top_k: int
  activation: str = 'relu'
  shared_mix: str = 'add'
  capacity_factor: float | None = None
  # Router options, as passed to MoEBlock(router_options=...).
  options: tuple = ()
  train: bool = False
  step: int = 0

  def opt(self, name: str, default: Any) -> Any:
    options = dict(self.options)
    value = options.get(name, default)
    return default if value is None else value

  def flag(self, name: str) -> bool:
    return bool(dict(self.opt('parity', {})).get(name, False))


# ------------------------------------------------------------ primitives ---

def sigmoid(z):
  return 1.0 / (1.0 + jnp.exp(-z))


def softmax(z):
  z = z - jnp.max(z)
  ez = jnp.exp(z)
  return ez / jnp.sum(ez)


def renorm(values):
  """g_j = v_j / (Σ v + 1e-20) (algorithms.md §0)."""
  total = 0.0
  for v in values:
    total = total + v
  return [v / (total + EPS) for v in values]


def activation(h, name: str):
  if name == 'relu':
    return jnp.maximum(h, 0.0)
  if name == 'gelu':
    return 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
  if name == 'gelu_tanh':
    c = math.sqrt(2.0 / math.pi)
    return 0.5 * h * (1.0 + jnp.tanh(c * (h + 0.044715 * h ** 3)))
  if name == 'swiglu':
    # W_in = [W_gate | W_up]; silu(gate) * up.
    f = h.shape[-1] // 2
    gate, up = h[:f], h[f:]
    return gate * sigmoid(gate) * up
  raise ValueError(name)


def entries(a) -> list:
  """The rows of a as a list (one op, cheaper than one index op per row)."""
  return list(jnp.unstack(a))


@functools.partial(jax.jit, static_argnames=('act',))
def _mlp(p: dict, v, e, act: str):
  # jit only saves eager dispatch time (one call per slot instead of ~8).
  get = (lambda a: a) if e is None else (lambda a: a[e])
  h = v @ get(p['w_in'])
  if 'b_in' in p:
    h = h + get(p['b_in'])
  y = activation(h, act) @ get(p['w_out'])
  if 'b_out' in p:
    y = y + get(p['b_out'])
  return y


def mlp(p: dict, v, act: str, e: int | None = None):
  """One expert (or the shared MLP when e is None) on one token v [D]:
  act(v @ W_in[e] + b_in[e]) @ W_out[e] + b_out[e]."""
  return _mlp(p, v, None if e is None else jnp.asarray(e, jnp.int32), act)


@jax.jit
def _constant_expert(c: dict, v, n):
  alpha = softmax(v @ c['gate'][n])                             # [2]
  return alpha[0] * v + alpha[1] * c['value'][n]


def constant_expert(c: dict, v, n: int):
  """MoE++ constant expert n: α₁ v + α₂ value_n, [α₁, α₂] = softmax(v W_n)."""
  return _constant_expert(c, v, jnp.asarray(n, jnp.int32))


# Gaps of the routing decisions taken by the running naive_plan (see Plan).
_MARGINS: list[float] = []


def top_k_ids(scores, k: int) -> tuple[int, ...]:
  """The k largest entries, descending; ties go to the lower index.

  Records the gap between the k-th and the (k+1)-th score: a tiny gap would
  let float rounding flip the decision. Exact ties of mask values (0 or -inf,
  DeepSeek group masking; 0 for ReLU) are deterministic and not recorded.
  """
  s = np.asarray(scores, np.float64)
  order = sorted(range(len(s)), key=lambda i: (-s[i], i))
  if k < len(s):
    a, b = s[order[k - 1]], s[order[k]]
    if np.isfinite(a) and np.isfinite(b) and not a == b == 0.0:
      _MARGINS.append(a - b)
  return tuple(order[:k])


def _concrete(a):
  return np.asarray(jax.device_get(a))


# ---------------------------------------------------------------- routers ---
#
# Each router maps one token to (selected, slots):
#   selected: tuple of ints, the decision (computed when `sel` is None);
#   slots: list of (kind, id, weight) with kind in
#     'ffn' (routed expert id), 'copy', 'const' (constant expert id), 'zero',
#     'null'; weights are jnp scalars (signed for TC-MoE).

def _linear(rp, v):
  z = v @ rp['w']
  if 'b' in rp:
    z = z + rp['b']
  return z


def _gather(vec, ids):
  """[vec[i] for i in ids] as jnp scalars."""
  parts = entries(vec)
  return [parts[i] for i in ids]


def route_smoe(spec, rp, rs, v, sel, ctx):
  """§3.1: p = softmax(z), S = TopK(p, k), g = renorm(p, S)."""
  p = softmax(_linear(rp, v))
  if sel is None:
    sel = top_k_ids(_concrete(p), spec.top_k)
  top = _gather(p, sel)
  g = renorm(top) if spec.opt('normalize_topk', True) else top
  return sel, [('ffn', e, w) for e, w in zip(sel, g)]


def route_sigmoid(spec, rp, rs, v, sel, ctx):
  """§3.2: p = σ(z), S = TopK(p, k), g = renorm(p, S) (or σ(z_S))."""
  p = sigmoid(_linear(rp, v))
  if sel is None:
    sel = top_k_ids(_concrete(p), spec.top_k)
  top = _gather(p, sel)
  g = renorm(top) if spec.opt('normalize_topk', True) else top
  return sel, [('ffn', e, w) for e, w in zip(sel, g)]


def route_xmoe(spec, rp, rs, v, sel, ctx):
  """§3.3: s_e = <r/max(|r|,1e-4), ε_e>, p = softmax(s/τ), τ = 0.3."""
  tau = spec.opt('temperature', 0.3)
  r = _linear(rp, v)
  r_hat = r / jnp.maximum(jnp.sqrt(jnp.sum(r * r)), 1e-4)
  s = rp['embed'] @ r_hat                                       # [E]
  p = softmax(s / tau)
  if spec.flag('xmoe_double_softmax'):
    p = softmax(p)
  if sel is None:
    sel = top_k_ids(_concrete(p), spec.top_k)
  g = renorm(_gather(p, sel))
  return sel, [('ffn', e, w) for e, w in zip(sel, g)]


def _cosine_like(spec, rp, v, sel, theta):
  """§3.4/§3.5: ℓ_e = cos(x, w_e)/τ + b_e, τ = 0.2 by default."""
  tau = spec.opt('temperature', 0.2)
  w, b = rp['w'], rp['b']                                       # [D, E], [E]
  x_norm = jnp.sqrt(jnp.sum(v * v))
  w_norm = jnp.sqrt(jnp.sum(w * w, axis=0))                     # [E]
  if theta is None:
    den = jnp.maximum(x_norm, 1e-12) * jnp.maximum(w_norm, 1e-12)
  else:
    den = (x_norm + theta) * (w_norm + theta)
  cos = (v @ w) / den
  if spec.flag('bias_on_probs'):
    # LibMoE v1.1 (D10): b on p = softmax(ℓ); softmax over the selected p + b.
    q = softmax(cos / tau) + b
  else:
    q = cos / tau + b
  if sel is None:
    sel = top_k_ids(_concrete(q), spec.top_k)
  g = softmax(jnp.stack(_gather(q, sel)))
  return sel, [('ffn', e, w) for e, w in zip(sel, entries(g))]


def route_cosine(spec, rp, rs, v, sel, ctx):
  return _cosine_like(spec, rp, v, sel, None)


def route_perturbed_cosine(spec, rp, rs, v, sel, ctx):
  return _cosine_like(spec, rp, v, sel, spec.opt('cosine_theta', 0.1))


def hyper_k(spec) -> int:
  """§3.6: k_t = round((k_max - k_min) t / t_total) + k_min in training."""
  k_max = spec.top_k
  if not spec.train:
    return k_max
  k_min = spec.opt('hyper_k_min', 1)
  frac = (k_max - k_min) * spec.step / spec.opt('total_steps', 1)
  assert abs(frac - math.floor(frac) - 0.5) > 1e-6, 'pick a step off .5'
  return min(max(int(round(frac)) + k_min, k_min), k_max)


def route_hyper(spec, rp, rs, v, sel, ctx):
  """§3.6: [W | b] = reshape(H(e), (E, D+1)); g = softmax over the k_t selected."""
  d = v.shape[0]
  hidden = jnp.maximum(rp['embedding'][0] @ rs['hyper_w1'] + rs['hyper_b1'],
                       0.0)
  flat = hidden @ rs['hyper_w2'] + rs['hyper_b2']             # [E (D + 1)]
  wb = flat.reshape(spec.num_experts, d + 1)                   # row e: [w_e, b_e]
  z = wb[:, :d] @ v + wb[:, d]
  p = softmax(z)
  if sel is None:
    sel = top_k_ids(_concrete(z), hyper_k(spec))
  g = renorm(_gather(p, sel))
  return sel, [('ffn', e, w) for e, w in zip(sel, g)]


def route_deepseek_v3(spec, rp, rs, v, sel, ctx):
  """§3.8: s = σ(z); select on s + b (group-limited); g = renorm(s, S) × scale."""
  e_dim = spec.num_experts
  s = sigmoid(_linear(rp, v))
  if sel is None:
    biased = _concrete(s) + _concrete(rs['bias'])
    n_group = spec.opt('n_group', 1)
    if n_group > 1:
      size = e_dim // n_group
      group_score = [sum(sorted(biased[g * size:(g + 1) * size])[-2:])
                     for g in range(n_group)]
      kept = top_k_ids(group_score, spec.opt('topk_group', 1))
      fill = 0.0 if spec.flag('group_mask_zero') else -np.inf
      biased = np.array([biased[e] if e // size in kept else fill
                         for e in range(e_dim)])
    sel = top_k_ids(biased, spec.top_k)
  scale = spec.opt('routed_scaling_factor', 1.0)
  g = renorm(_gather(s, sel))
  return sel, [('ffn', e, w * scale) for e, w in zip(sel, g)]


def moepp_ranges(spec):
  e = spec.num_experts
  c = spec.opt('n_const', 6)
  p = spec.opt('n_copy', 1)
  zr = spec.opt('n_zero', 1)
  return {'ffn': (0, e), 'const': (e, e + c), 'copy': (e + c, e + c + p),
          'zero': (e + c + p, e + c + p + zr)}


def moepp_kind(spec, slot: int) -> tuple[str, int]:
  for kind, (lo, hi) in moepp_ranges(spec).items():
    if lo <= slot < hi:
      return kind, slot - lo
  raise ValueError(slot)


def route_moe_plus_plus(spec, rp, rs, v, sel, ctx):
  """§3.9: z = W x + G z_prev; p = softmax(z); zero slots dropped, renorm."""
  if spec.opt('router_depth', 1) == 1:
    z = _linear(rp, v)
  else:
    z = jnp.tanh(v @ rp['w']) @ rp['w_out']
  prev = ctx.get('prev')
  if spec.opt('gate_residual', True) and prev is not None:
    z = z + prev @ rp['gate_map']
  p = softmax(z)
  if sel is None:
    sel = top_k_ids(_concrete(p), spec.top_k)
  kinds = [moepp_kind(spec, i) for i in sel]
  top = _gather(p, sel)
  if spec.opt('zero_weight_mode', 'drop') == 'drop':
    kept = [w for w, (kind, _) in zip(top, kinds) if kind != 'zero']
    g = [0.0 if kind == 'zero' else w / (sum(kept) + EPS)
         for w, (kind, _) in zip(top, kinds)]
  else:
    g = renorm(top)
  return sel, [(kind, i, w) for (kind, i), w in zip(kinds, g)]


def route_tc_moe(spec, rp, rs, v, sel, ctx):
  """§3.10: offsets, softmax over 2E+N, D = Σ non-null sel + Σ all null."""
  e_dim = spec.num_experts
  n_null = spec.opt('num_null', spec.top_k)
  offset = np.array([0.0] * e_dim + [spec.opt('tc_neg_offset', -1.0)] * e_dim
                    + [spec.opt('tc_null_offset', -10.0)] * n_null, np.float32)
  p = softmax(_linear(rp, v) + offset)
  if sel is None:
    sel = top_k_ids(_concrete(p), spec.top_k)
  ps = entries(p)
  denom = sum(ps[i] for i in sel if i < 2 * e_dim)
  denom = denom + sum(ps[2 * e_dim:])                          # all null slots
  slots = []
  for i in sel:
    if i >= 2 * e_dim:
      slots.append(('null', i - 2 * e_dim, 0.0))
    else:
      sign = 1.0 if i < e_dim else -1.0
      slots.append(('ffn', i % e_dim, sign * ps[i] / (denom + EPS)))
  return sel, slots


def remoe_slots(spec) -> int:
  if spec.flag('remoe_libmoe'):
    return spec.top_k
  return spec.opt('remoe_max_active', min(2 * spec.top_k, spec.num_experts))


def route_remoe(spec, rp, rs, v, sel, ctx):
  """§3.11: g_e = ReLU(z_e), the K_slot largest active ones (no renorm)."""
  z = _linear(rp, v)
  r = jnp.maximum(z, 0.0)
  if sel is None:
    rc = _concrete(r)
    if spec.flag('remoe_libmoe'):
      sel = top_k_ids(rc, spec.top_k)    # fixed k, zeros included (D8 parity)
    else:
      _MARGINS.append(float(np.min(np.abs(_concrete(z)))))   # active or not
      active = [e for e in range(spec.num_experts) if rc[e] > 0]
      kept = top_k_ids(rc[active], min(remoe_slots(spec), len(active)))
      sel = tuple(active[i] for i in kept)
  return sel, [('ffn', e, w) for e, w in zip(sel, _gather(r, sel))]


ROUTERS = {
    'smoe': route_smoe,
    'deepseek_v2': route_smoe,
    'sigmoid': route_sigmoid,
    'xmoe': route_xmoe,
    'cosine': route_cosine,
    'perturbed_cosine': route_perturbed_cosine,
    'hyper': route_hyper,
    'deepseek_v3': route_deepseek_v3,
    'moe_plus_plus': route_moe_plus_plus,
    'tc_moe': route_tc_moe,
    'remoe': route_remoe,
}


# ------------------------------------------------------------------ layer ---

@dataclasses.dataclass(frozen=True)
class Plan:
  """The routing decisions: per token the selected router ids (router order),
  and the (token, slot) pairs that capacity mode drops."""

  selected: tuple
  dropped: frozenset = frozenset()
  # The smallest gap between a selected and a rejected score (or |z| around
  # ReMoE's ReLU): the decisions are robust to rounding when this is not tiny.
  margin: float = math.inf


def _capacity_drops(spec, selected_slots, num_slots: int) -> frozenset:
  """GShard slot-major priority: slot 0 of every token before slot 1, ...;
  capacity C = ceil(cf T K / E) rows per expert (moe_jax dispatch.py)."""
  t = len(selected_slots)
  cap = max(1, math.ceil(spec.capacity_factor * t * num_slots
                         / spec.num_experts))
  used = [0] * spec.num_experts
  dropped = set()
  for j in range(num_slots):
    for tok in range(t):
      if j >= len(selected_slots[tok]):
        continue
      kind, e, _ = selected_slots[tok][j]
      if kind != 'ffn':
        continue
      if used[e] < cap:
        used[e] += 1
      else:
        dropped.add((tok, j))
  return frozenset(dropped)


def drop_top(slots: list, n: int) -> list:
  """§9 DropTop-n: the token's n first-ranked slots leave, and the rest are
  rescaled by Σ|w| / Σ|w_kept| (plain renormalisation when Σw = 1)."""
  if not n:
    return slots
  kept = slots[n:]
  total = sum(jnp.abs(w) for _, _, w in slots)
  kept_total = sum(jnp.abs(w) for _, _, w in kept)
  scale = jnp.where(kept_total > 0,
                    total / jnp.where(kept_total > 0, kept_total, 1.0), 0.0)
  return [(kind, i, w * scale) for kind, i, w in kept]


def num_slots(spec) -> int:
  """Slots per token of the layer's static layout (capacity accounting)."""
  return remoe_slots(spec) if spec.router == 'remoe' else spec.top_k


def _route_tokens(params, state, x, spec: Spec, plan, prev_logits):
  """Pass 1: every token's (selected ids, slots)."""
  b, s, d = x.shape
  xt = x.reshape(b * s, d)
  rp = params['router']['router']
  rs = state.get('router', {}).get('router', {}) if state else {}
  route = ROUTERS[spec.router]
  tokens = entries(xt)
  prevs = [None] * (b * s) if prev_logits is None else entries(prev_logits)
  token_slots, selected = [], []
  for t in range(b * s):
    sel = None if plan is None else plan.selected[t]
    sel, slots = route(spec, rp, rs, tokens[t], sel, {'prev': prevs[t]})
    token_slots.append(drop_top(slots, spec.opt('drop_top', 0)))
    selected.append(tuple(int(i) for i in sel))
  return token_slots, tuple(selected)


def naive_plan(params, state, x, spec: Spec, prev_logits=None) -> Plan:
  """The routing decisions for concrete inputs (routers only, no experts)."""
  _MARGINS.clear()
  token_slots, selected = _route_tokens(params, state, x, spec, None,
                                        prev_logits)
  dropped = frozenset()
  if spec.capacity_factor is not None:
    dropped = _capacity_drops(spec, token_slots, num_slots(spec))
  return Plan(selected, dropped, min(_MARGINS, default=math.inf))


def naive_moe(params, state, x, spec: Spec, plan: Plan | None = None,
              prev_logits=None):
  """y [B, S, D] of the MoE block, one token and one slot at a time.

  Args:
    params: the block's 'params' collection (unboxed).
    state: the block's 'router_state' collection ({} when absent).
    x: [B, S, D].
    spec: the layer configuration.
    plan: the routing decisions (naive_plan); None computes them, which needs
      concrete (untraced) inputs.
    prev_logits: [T, E'] MoE++ gating-residual input, or None.
  Returns:
    y [B, S, D].
  """
  if plan is None:
    plan = naive_plan(params, state, x, spec, prev_logits)
  b, s, d = x.shape
  xt = x.reshape(b * s, d)
  token_slots, _ = _route_tokens(params, state, x, spec, plan, prev_logits)
  scale = spec.top_k if spec.flag('moepp_mul_topk') else 1
  # Pass 2: run the selected experts.
  tokens = entries(xt)
  out = []
  for t in range(b * s):
    v = tokens[t]
    v_in = v * scale           # MoE++ `moepp_mul_topk`: experts see k x.
    y = jnp.zeros((d,), jnp.float32)
    for j, (kind, i, w) in enumerate(token_slots[t]):
      if (t, j) in plan.dropped:
        continue
      if kind == 'ffn':
        y = y + w * mlp(params['experts'], v_in, spec.activation, i)
      elif kind == 'copy':
        y = y + w * v_in
      elif kind == 'const':
        y = y + w * constant_expert(params['constant'], v_in, i)
      # 'zero' and 'null' slots contribute nothing.
    if 'shared' in params:
      y_shared = mlp(params['shared'], v, spec.activation)
      y = y + y_shared if spec.shared_mix == 'add' else 0.5 * (y + y_shared)
    out.append(y)
  return jnp.stack(out).reshape(b, s, d)
