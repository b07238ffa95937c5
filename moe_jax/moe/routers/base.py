"""Shared types and helpers of every router.

Dimension legend: T tokens, D model width, E routed FFN experts, E' router
output width (E plus special slots), K slots per token.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array
Params = Mapping[str, Array]

# The renormalisation epsilon of the LM stack (algorithms.md §0).
RENORM_EPS = 1e-20


@struct.dataclass
class RouterOutput:
  """What a router decided for each token.

  Attributes:
    expert_index: [T, K] int32 FFN expert of each slot, or E (the sentinel)
      for slots that need no FFN compute (TC-MoE null slots, MoE++ zero /
      copy / constant slots, inactive HyperRouter or ReMoE slots). Dispatch
      gives sentinel slots no rows.
    weight: [T, K] float32 combine weight of each slot; may be negative
      (TC-MoE signs) or zero (null / masked slots).
    choice: [T, K] int32 selected id in the router's output space [0, E'),
      or -1 for an inactive slot. Balance losses and statistics count these.
    probs: [T, E'] float32 the scores the balance loss averages (softmax,
      normalised sigmoid, ...), each row summing to 1.
    logits: [T, E'] float32 raw router logits (z-loss, entropy losses, MoE++
      gating residual).
    balance_eta: [E'] float32 per-slot weight of the balance loss (MoE++
      heterogeneous loss; ones elsewhere).
    special: algorithm-specific per-token arrays evaluated by the layer
      (MoE++: `copy_weight` [T], `const_weight` [T, n_const]).
    stats: algorithm-specific statistics (ReMoE overflow, ...), scalars.
    gate_softmax: [T, E'] the distribution LibMoE logs as `gate_softmax`
      (softmax(z) for the sigmoid routers, whose `probs` is the normalised
      sigmoid); None means `probs`. Analysis metrics (§9) read it.
    slot_weight: [T, K] every selected slot's routing weight, including the
      slots served outside the grouped matmul, which `weight` zeroes (MoE++
      copy / constant experts, and zero experts with zero_weight_mode
      'keep'); None means `weight`. These are §9's w_t: traces, weight
      entropy and router margin read them.
  """

  expert_index: Array
  weight: Array
  choice: Array
  probs: Array
  logits: Array
  balance_eta: Array
  special: dict = struct.field(default_factory=dict)
  stats: dict = struct.field(default_factory=dict)
  gate_softmax: Array | None = None
  slot_weight: Array | None = None

  @property
  def analysis_probs(self) -> Array:
    return self.probs if self.gate_softmax is None else self.gate_softmax

  @property
  def analysis_weight(self) -> Array:
    return self.weight if self.slot_weight is None else self.slot_weight


@dataclasses.dataclass(frozen=True)
class RouterConfig:
  """Every option of every router; each router reads the fields it needs.

  Defaults are LibMoE's LM stack (algorithms.md §2.1) unless noted.
  """

  # Routed FFN experts E.
  num_experts: int
  # Slots per token k (experts per token).
  top_k: int
  # Model width d.
  d_model: int
  # Std of the router weight init ('normal'); LM: sqrt(2/L)/sqrt(d), VLM: 0.02.
  init_std: float = 0.02
  # Router weight init: 'normal' | 'renorm_keep_std' (Csordás) |
  # 'torch_default' (v1.1 U(-1/sqrt(d), 1/sqrt(d)) for W and b; D10b parity).
  router_init: str = 'normal'
  # Renormalise the top-k weights to sum to 1 (sigmoid router; §3.2).
  normalize_topk: bool = True
  # Noise before top-k in training: 'none' | 'noisy_topk' (Shazeer et al. 2017).
  noise: str = 'none'
  # Probability of dropping a (token, expert) score before top-k in training.
  expert_dropout: float = 0.0
  # Softmax temperature; None means the router's default: XMoE tau = 0.3
  # (§3.3), cosine / perturbed cosine tau = 0.2 (§3.4-3.5).
  temperature: float | None = None
  # XMoE low-rank dimension; None means E // 2 (LibMoE).
  xmoe_dim: int | None = None
  # XMoE expert-embedding init: 'orthogonal' (LM, gain 0.32) | 'normal' (VLM).
  xmoe_embed_init: str = 'orthogonal'
  # Norm every XMoE expert embedding is projected to after each update.
  xmoe_embed_norm: float = 1.5
  # Perturbed cosine norm offsets theta_x, theta_w (§3.5).
  cosine_theta: float = 0.1
  # HyperRouter hypernetwork hidden width; None means d // 4.
  hyper_hidden: int | None = None
  # HyperRouter k schedule (k_min, k_max); top_k must equal k_max.
  hyper_k_min: int = 1
  # Steps over which HyperRouter's k grows from k_min to top_k.
  total_steps: int = 1
  # DeepSeek-V3 expert groups and groups kept (1 / 1 = no group limit).
  n_group: int = 1
  topk_group: int = 1
  # DeepSeek-V3 scale of the routed weights (LibMoE never applied 2.5).
  routed_scaling_factor: float = 1.0
  # DeepSeek-V3 aux-loss-free bias update rate gamma; 0 disables the bias.
  bias_update_rate: float = 0.0
  # MoE++ zero-computation experts.
  n_zero: int = 1
  n_copy: int = 1
  n_const: int = 6
  # MoE++ router depth 1 (linear) or 2 (Linear-Tanh-Linear).
  router_depth: int = 1
  # MoE++ gating residual from the previous MoE layer's logits.
  gate_residual: bool = True
  # MoE++ weight of selected zero experts: 'drop' (reference) | 'keep' (LibMoE VLM).
  zero_weight_mode: str = 'drop'
  # MoE++ heterogeneous balance weight tau of zero-computation experts.
  hetero_tau: float = 0.75
  # TC-MoE null slots (None means top_k) and logit offsets.
  num_null: int | None = None
  tc_neg_offset: float = -1.0
  tc_null_offset: float = -10.0
  # ReMoE slot budget per token; None means min(2k, E).
  remoe_max_active: int | None = None
  # DropTop-n inference ablation (algorithms.md §9): remove each token's n
  # highest-ranked selected slots and renormalise the rest; 0 = off.
  drop_top: int = 0
  # LibMoE parity flags (algorithms.md §5); all off by default.
  parity: Mapping[str, bool] = dataclasses.field(default_factory=dict)

  def flag(self, name: str) -> bool:
    return bool(self.parity.get(name, False))


@dataclasses.dataclass(frozen=True)
class StepHook:
  """Per-step router state that the train step keeps, outside the layer.

  For algorithms whose training rule adapts a loss weight from the step's
  statistics (ReMoE's λ, algorithms.md §3.11). The layer returns its losses
  unweighted and never reads this state; the train step scales the named
  losses by it, then updates it after the optimiser step. It is checkpointed
  in `TrainState.router_hook`.

  options_key: the sub-dict of the experiment's `loss` config holding the
    hook's settings (e.g. 'remoe' -> config.loss.remoe).
  check(options) -> None: raises ValueError naming a bad option (bare name).
  init(cfg, num_layers, options) -> state pytree.
  loss_scales(state) -> {loss name: [L] multiplier of that per-layer loss}.
  update(state, layer_stats {name: [L]}, cfg, options) -> new state.
  metrics(state) -> {name: scalar} logged with the step.
  """

  options_key: str
  check: Callable[[Mapping[str, Any]], None]
  init: Callable[..., Any]
  loss_scales: Callable[[Any], dict[str, Array]]
  update: Callable[..., Any]
  metrics: Callable[[Any], dict[str, Array]]


@dataclasses.dataclass(frozen=True)
class RouterSpec:
  """A registered routing algorithm: everything the rest of moe_jax needs.

  init(key, cfg) -> (params, state): trainable params, non-trainable state.
  route(params, state, x[T, D], cfg, *, step, rng, train, prev_logits)
    -> RouterOutput.
  output_width(cfg) -> E'.
  default_losses: names of the losses this algorithm trains with.
  post_update(params, state, stats, cfg) -> (params, state): the update the
    train step applies after the optimiser (DeepSeek-V3 bias, XMoE norms).
  route_applies_drop_top: True when `route` applies cfg.drop_top itself
    (MoE++, whose special slots are split off inside route); otherwise
    Router applies drop_top() after it.
  check(cfg) -> None: the algorithm's own option checks (ValueError naming
    the option); the generic ones live in router.make_config.
  parity_flags: {flag: the LibMoE defect it reproduces (algorithms.md
    §4-5)}; the only flags `cfg.parity` may set for this router, and the
    ones its configs list (all off).
  slots(cfg) -> K: slots per token of the output; None means cfg.top_k.
  step_hook: per-step state kept by the train step (StepHook), or None.
  """

  init: Callable[..., tuple[dict, dict]]
  route: Callable[..., RouterOutput]
  output_width: Callable[[RouterConfig], int]
  default_losses: tuple[str, ...]
  post_update: Callable[..., tuple[dict, dict]] | None = None
  route_applies_drop_top: bool = False
  check: Callable[[RouterConfig], None] | None = None
  parity_flags: Mapping[str, str] = dataclasses.field(default_factory=dict)
  slots: Callable[[RouterConfig], int] | None = None
  step_hook: StepHook | None = None


def router_weight_init(key: Array, cfg: RouterConfig, width: int) -> dict:
  """Router weight `w` [D, width] (and bias `b` [width]) per `cfg.router_init`."""
  d = cfg.d_model
  if cfg.router_init == 'normal':
    w = cfg.init_std * jax.random.normal(key, (d, width), jnp.float32)
    return {'w': w}
  if cfg.router_init == 'renorm_keep_std':
    # Csordás' renorm_keep_std: every expert row to unit norm, then rescale the
    # matrix to its pre-normalisation std, so all rows share one norm.
    w = cfg.init_std * jax.random.normal(key, (d, width), jnp.float32)
    std = jnp.std(w)
    w = w / jnp.linalg.norm(w, axis=0, keepdims=True)
    return {'w': w * std / jnp.std(w)}
  if cfg.router_init == 'torch_default':
    # PyTorch nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), bias too.
    bound = 1.0 / math.sqrt(d)
    kw, kb = jax.random.split(key)
    return {
        'w': jax.random.uniform(kw, (d, width), jnp.float32, -bound, bound),
        'b': jax.random.uniform(kb, (width,), jnp.float32, -bound, bound),
    }
  raise ValueError(
      f"router_init must be 'normal', 'renorm_keep_std' or 'torch_default', "
      f'got {cfg.router_init!r}')


def linear_logits(params: Params, x: Array) -> Array:
  """z = x W (+ b) in float32: x [T, D] -> [T, width]."""
  z = jnp.einsum('td,de->te', x.astype(jnp.float32), params['w'])
  if 'b' in params:
    z = z + params['b']
  return z


def add_training_noise(z: Array, params: Params, x: Array, cfg: RouterConfig,
                       rng: Array | None, train: bool) -> Array:
  """Noisy top-k (Shazeer et al. 2017, eq. 4): z + N(0,1) softplus(x W_noise)."""
  if cfg.noise == 'none' or not train:
    return z
  if rng is None:
    raise ValueError("noise='noisy_topk' needs an rng in training")
  scale = jax.nn.softplus(
      jnp.einsum('td,de->te', x.astype(jnp.float32), params['w_noise']))
  return z + jax.random.normal(rng, z.shape, z.dtype) * scale


def drop_experts(scores: Array, cfg: RouterConfig, rng: Array | None,
                 train: bool) -> Array:
  """σ-MoE expert dropout: each (token, expert) score -> -inf with prob p."""
  if cfg.expert_dropout == 0.0 or not train:
    return scores
  if rng is None:
    raise ValueError('expert_dropout > 0 needs an rng in training')
  drop = jax.random.bernoulli(rng, cfg.expert_dropout, scores.shape)
  return jnp.where(drop, -jnp.inf, scores)


def renormalise(values: Array, axis: int = -1) -> Array:
  """g_j = v_j / (sum v + 1e-20), the LM stack's renorm (§0)."""
  return values / (jnp.sum(values, axis=axis, keepdims=True) + RENORM_EPS)


def drop_top_slots(choice: Array, weight: Array,
                   n: int) -> tuple[Array, Array]:
  """DropTop-n (algorithms.md §9) on one router's slots.

  Every router selects with lax.top_k, so slot order is rank order: the
  token's n highest-ranked active slots (choice >= 0) are removed, whatever
  they hold (FFN, MoE++ special, TC-MoE null). The remaining weights are
  scaled by Σ|w| / Σ|w_kept| so the token's routed mass is unchanged: for
  renormalised top-k this is exactly w / Σ w_kept; for routers that do not
  renormalise (ReMoE, sigmoid without renorm) and for TC-MoE's signed weights
  it is the same rescaling without changing the output's scale. A token left
  with no weight routes nowhere.

  Args:
    choice: [T, K] selected ids in the router's output space, -1 = inactive.
    weight: [T, K] combine weights.
    n: slots to remove per token (0 returns the inputs unchanged).

  Returns:
    (choice [T, K] with removed slots set to -1, weight [T, K] renormalised).
  """
  if n == 0:
    return choice, weight
  active = choice >= 0                                          # [T, K]
  rank = jnp.cumsum(active, axis=-1) - 1                        # [T, K]
  dropped = active & (rank < n)
  kept = jnp.where(dropped, 0.0, weight)
  total = jnp.sum(jnp.abs(weight), axis=-1, keepdims=True)      # [T, 1]
  kept_total = jnp.sum(jnp.abs(kept), axis=-1, keepdims=True)   # [T, 1]
  scale = jnp.where(kept_total > 0,
                    total / jnp.where(kept_total > 0, kept_total, 1.0), 0.0)
  return jnp.where(dropped, -1, choice), kept * scale


def drop_top(out: RouterOutput, n: int, num_experts: int) -> RouterOutput:
  """DropTop-n on a RouterOutput: removed slots get no FFN rows (index E)."""
  choice, weight = drop_top_slots(out.choice, out.weight, n)
  index = jnp.where(choice < 0, num_experts, out.expert_index)
  return out.replace(expert_index=index.astype(jnp.int32), weight=weight,
                     choice=choice.astype(jnp.int32))


def ones_eta(width: int) -> Array:
  return jnp.ones((width,), jnp.float32)


def plain_output(index: Array, weight: Array, probs: Array,
                 logits: Array, **extra: Any) -> RouterOutput:
  """RouterOutput of a router whose selected slots are all FFN experts."""
  index = index.astype(jnp.int32)
  return RouterOutput(
      expert_index=index, weight=weight.astype(jnp.float32), choice=index,
      probs=probs, logits=logits, balance_eta=ones_eta(probs.shape[-1]),
      **extra)


def split_rng(rng: Array | None, n: int) -> list[Array | None]:
  if rng is None:
    return [None] * n
  return list(jax.random.split(rng, n))
