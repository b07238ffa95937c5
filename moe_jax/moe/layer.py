"""The MoE block: router -> dispatch -> grouped experts -> combine (+ special experts).

  y = Σ_k w_{t,k} f_{e(t,k)}(x_t)                 routed FFN experts (signed for TC-MoE)
    + c_t x_t + Σ_n a_{t,n} (α₁ x_t + α₂ v_n)      MoE++ copy / constant experts
  and a shared expert mixed as y + f_s(x) ('add', LM), 0.5 f_s(x) + 0.5 y
  ('half', LibMoE VLM) or y + σ(x w_g) f_s(x) ('sigmoid_gate', Qwen2-MoE's
  gated shared expert, w_g the [D, 1] parameter 'shared_gate').

The block returns (y, aux): aux['losses'] holds the UNWEIGHTED auxiliary losses
(train.py weights and sums them over layers), aux['metrics'] the routing
statistics (including what the train step updates router state from), and
aux['router_logits'] the logits MoE++'s gating residual feeds to the next layer.

The output width D' (`d_out`) is D unless set: a projector MoE (LLaVA's
mlp2x_gelu, D -> F -> D') routes D-wide tokens to experts [D, F] -> [F, D'].
The shared expert has the same output width; MoE++'s copy and constant
experts return x itself, so they need D' = D.

Dimension legend: B batch, S sequence, T = B*S, D model (input) width, D'
output width, F expert width, E experts, K slots, R dispatched rows, N MoE++
constant experts.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.moe import activations
from moe_jax.moe import backends
from moe_jax.moe import dispatch as dispatch_lib
from moe_jax.moe import expert_parallel
from moe_jax.moe import experts as experts_lib
from moe_jax.moe import losses as losses_lib
from moe_jax.moe import metrics as metrics_lib
from moe_jax.moe import router as router_lib
from moe_jax.validation import require

SHARED_MIXES = ('add', 'half', 'sigmoid_gate')


class ConstantExperts(nn.Module):
  """MoE++ constant experts: f_n(x) = α₁ x + α₂ v_n, [α₁, α₂] = softmax(W_n x)."""

  num: int
  d_model: int

  @nn.compact
  def __call__(self, x, weight):
    """x [T, D], weight [T, N] -> Σ_n weight_n f_n(x) [T, D]."""
    gate = self.param('gate', nn.initializers.normal(0.02),
                      (self.num, self.d_model, 2))
    value = self.param('value', nn.initializers.normal(1.0),
                       (self.num, self.d_model))
    alpha = jax.nn.softmax(
        jnp.einsum('td,ndj->tnj', x.astype(jnp.float32), gate), axis=-1)
    a_x = jnp.sum(weight * alpha[..., 0], axis=-1, keepdims=True)   # [T, 1]
    a_v = jnp.einsum('tn,nd->td', weight * alpha[..., 1], value)
    return (a_x * x + a_v).astype(x.dtype)


class MoEBlock(nn.Module):
  """A Mixture-of-Experts FFN block; see the module docstring."""

  # Model width D.
  d_model: int
  # Routed FFN experts E.
  num_experts: int
  # Experts per token k.
  top_k: int
  # Hidden width F of each routed expert.
  expert_width: int
  # Output width D' of the block; None means d_model (D' = D).
  d_out: int | None = None
  # Routing algorithm, a key of router.ROUTERS.
  router: str = 'smoe'
  # RouterConfig fields (temperature, parity flags, ...).
  router_options: Mapping[str, Any] | None = None
  # Expert activation: 'relu' | 'gelu' | 'gelu_tanh' | 'swiglu'.
  activation: str = 'relu'
  # Biases in the experts (upcycled MLPs have them; LibMoE LM experts do not).
  expert_bias: bool = False
  # Grouped-matmul backend: 'loop' | 'ragged_dot' | 'blocked' | 'pallas'.
  backend: str = 'blocked'
  # None: dropless. A number: GShard capacity factor (tokens may drop).
  capacity_factor: float | None = None
  # Shared experts merged into one always-on MLP of width num * shared_width.
  shared_experts: int = 0
  # Width of one shared expert; None means expert_width.
  shared_width: int | None = None
  # 'add' (LM: y + shared) | 'half' (VLM: 0.5 shared + 0.5 routed) |
  # 'sigmoid_gate' (Qwen2-MoE: y + σ(x w_g) shared, w_g = 'shared_gate').
  shared_mix: str = 'add'
  # Loss names to compute; None means the router's default losses.
  losses: tuple[str, ...] | None = None
  # Balance loss: count 'all_k' slots (LM) or 'top1' (VLM Switch).
  balance_count_mode: str = 'all_k'
  # Balance loss grouping: per 'sequence' (LM) or whole 'batch'.
  balance_group: str = 'sequence'
  # Init stds of the routed experts' W_in / W_out (LM: s/sqrt(d), s/sqrt(E m)).
  w_in_std: float = 0.02
  w_out_std: float = 0.02
  # Init stds of the shared expert.
  shared_w_in_std: float = 0.02
  shared_w_out_std: float = 0.02
  # Mesh axis the routed experts are split over. When the context mesh
  # (jax.set_mesh) has it with size > 1, routed tokens travel to their
  # experts' devices by all-to-all (expert_parallel.py); None: never.
  expert_axis: str | None = 'expert'
  # Compute dtype of the expert matmuls (router and losses stay float32).
  dtype: Any = jnp.float32

  def router_config(self) -> router_lib.RouterConfig:
    return router_lib.make_config(
        self.router, num_experts=self.num_experts, top_k=self.top_k,
        d_model=self.d_model, **dict(self.router_options or {}))

  def _validate(self):
    require(self.expert_width >= 1, 'expert_width', 'an integer >= 1',
            self.expert_width)
    require(self.d_out is None or self.d_out >= 1, 'd_out',
            'None (= d_model) or an integer >= 1', self.d_out)
    require(self.shared_experts >= 0, 'shared_experts', 'an integer >= 0',
            self.shared_experts)
    require(self.shared_mix in SHARED_MIXES, 'shared_mix',
            f'one of {SHARED_MIXES}', self.shared_mix)
    require(self.capacity_factor is None or self.capacity_factor > 0,
            'capacity_factor', 'None (dropless) or a value > 0',
            self.capacity_factor)
    require(self.balance_count_mode in losses_lib.COUNT_MODES,
            'balance_count_mode', f'one of {losses_lib.COUNT_MODES}',
            self.balance_count_mode)
    require(self.balance_group in losses_lib.GROUPS, 'balance_group',
            f'one of {losses_lib.GROUPS}', self.balance_group)
    for name in ('w_in_std', 'w_out_std', 'shared_w_in_std',
                 'shared_w_out_std'):
      require(getattr(self, name) >= 0, name, 'a value >= 0',
              getattr(self, name))
    activations.check_activation(self.activation)
    bad = [n for n in (self.losses or ()) if n not in losses_lib.LOSSES]
    require(not bad, 'losses', f'names among {losses_lib.LOSSES}', bad)

  @property
  def out_width(self) -> int:
    """D': d_out, or d_model when it is None."""
    return self.d_model if self.d_out is None else self.d_out

  @nn.compact
  def __call__(self, x, *, train: bool = False, step=0, prev_logits=None):
    """x [B, S, D] -> (y [B, S, D'], aux)."""
    self._validate()
    cfg = self.router_config()
    backend = backends.get_backend(self.backend)
    b, s, d = x.shape
    xt = x.reshape(b * s, d)                                   # [T, D]
    rng = self.make_rng('router') if train and (
        cfg.noise != 'none' or cfg.expert_dropout > 0) else None
    with jax.named_scope('route'):
      out = router_lib.Router(self.router, cfg, name='router')(
          xt, step=step, train=train, prev_logits=prev_logits, rng=rng)
    # MoE++ reference parity: the experts (not the router) see k * x.
    scale = self.top_k if cfg.flag('moepp_mul_topk') else 1
    expert_in = (xt * scale).astype(self.dtype)
    params = experts_lib.FFNParams(
        self.num_experts, d, self.expert_width, self.activation,
        self.expert_bias, self.w_in_std, self.w_out_std, self.d_out,
        name='experts')()
    metrics = metrics_lib.routing_stats(out, b)
    y, metrics['dropped_slots'] = self._routed_experts(
        params, expert_in, out, backend)                        # [T, D']
    if out.special and (cfg.n_copy or cfg.n_const):
      y = y + self._special_experts(out, expert_in, cfg)
    if self.shared_experts:
      y_shared = self._shared_expert(xt)                        # [T, D']
      if self.shared_mix == 'sigmoid_gate':
        y = y + self._shared_gate(xt).astype(y_shared.dtype) * y_shared
      else:
        y = y + y_shared if self.shared_mix == 'add' else 0.5 * (y + y_shared)
    names = self.losses if self.losses is not None else (
        router_lib.ROUTERS[self.router].default_losses)
    aux = {
        'losses': losses_lib.compute(
            names, out, b, cfg, count_mode=self.balance_count_mode,
            group=self.balance_group),
        'metrics': metrics,
        'router_logits': out.logits,
        # Per-token routing for traces (moe_jax/trace.py); unused outputs
        # cost nothing under jit.
        'routing': {'choice': out.choice, 'weight': out.analysis_weight,
                    'probs': out.analysis_probs,
                    'top1': metrics_lib.top1_choice(out.analysis_probs)},
    }
    return y.reshape(b, s, self.out_width).astype(x.dtype), aux

  def _routed_experts(self, params, expert_in, out, backend):
    """Σ_k weight · FFN_expert(x) over the routed slots: ([T, D'], dropped).

    Three ways, one result when nothing drops: expert-parallel all-to-all
    when the context mesh splits the experts (dropless), sort-based dropless
    dispatch on one device, or GShard capacity buffers when a capacity factor
    is set (the only path that can drop; `dropped` counts the slots).
    """
    no_drops = jnp.zeros((), jnp.float32)
    if self.capacity_factor is not None:
      cap = dispatch_lib.plan_capacity(out.expert_index, out.weight,
                                       self.num_experts, self.capacity_factor)
      buffers = dispatch_lib.dispatch_capacity(expert_in, cap)  # [E, C, D]
      buffers = experts_lib.batched_ffn(params, buffers,
                                        activation=self.activation)
      return (dispatch_lib.combine_capacity(buffers, cap),
              cap.dropped.astype(jnp.float32))
    if expert_parallel.active_expert_shards(self.expert_axis) > 1:
      with jax.named_scope('expert_parallel'):
        return expert_parallel.ep_routed_ffn(
            params, expert_in, out.weight, out.expert_index,
            num_experts=self.num_experts, expert_axis=self.expert_axis,
            activation=self.activation, backend=backend), no_drops
    with jax.named_scope('dispatch'):
      # Tiles sized for this token count; the plan pads rows to the same.
      backend = backend.for_dispatch(out.expert_index.size, self.num_experts)
      plan = dispatch_lib.plan(out.expert_index, self.num_experts,
                               backend.row_alignment, backend.row_multiple)
    with jax.named_scope('experts'):
      return experts_lib.routed_ffn(params, expert_in, out.weight, plan,
                                    activation=self.activation,
                                    backend=backend), no_drops

  def _shared_expert(self, xt):
    """The always-on shared MLP (all shared experts merged): [T, D']."""
    width = self.shared_experts * (self.shared_width or self.expert_width)
    shared = experts_lib.FFNParams(
        None, self.d_model, width, self.activation, self.expert_bias,
        self.shared_w_in_std, self.shared_w_out_std, self.d_out,
        name='shared')()
    return experts_lib.dense_ffn(shared, xt.astype(self.dtype),
                                 activation=self.activation)

  def _shared_gate(self, xt):
    """σ(x w_g) [T, 1], float32 like the router (Qwen2-MoE shared gate)."""
    init = nn.with_logical_partitioning(
        nn.initializers.normal(self.shared_w_in_std), ('embed', None))
    w_g = self.param('shared_gate', init, (self.d_model, 1))    # [D, 1]
    return jax.nn.sigmoid(
        jnp.einsum('td,do->to', xt.astype(jnp.float32), w_g))   # [T, 1]

  def _special_experts(self, out, expert_in, cfg):
    """Copy and constant experts of MoE++ (zero otherwise): [T, D]."""
    require(self.out_width == self.d_model, 'd_out',
            f'None or d_model={self.d_model}: router {self.router!r} has '
            'copy / constant experts, which return x itself', self.d_out)
    y = jnp.zeros_like(expert_in)
    if 'copy_weight' in out.special:
      y = y + out.special['copy_weight'][:, None].astype(y.dtype) * expert_in
    if 'const_weight' in out.special and cfg.n_const:
      y = y + ConstantExperts(cfg.n_const, self.d_model, name='constant')(
          expert_in, out.special['const_weight'])
    return y


class DenseFFNBlock(nn.Module):
  """FLOP-matched dense baseline: x [B, S, D] -> FFN of width F -> [B, S, D'].

  D' = d_out, or d_model when it is None (LLaVA's projector: D -> F -> D').
  """

  d_model: int
  width: int
  # Output width D'; None means d_model.
  d_out: int | None = None
  activation: str = 'relu'
  use_bias: bool = True
  w_in_std: float = 0.02
  w_out_std: float = 0.02
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, **unused):
    activations.check_activation(self.activation)
    params = experts_lib.FFNParams(None, self.d_model, self.width,
                                   self.activation, self.use_bias,
                                   self.w_in_std, self.w_out_std, self.d_out,
                                   name='ffn')()
    y = experts_lib.dense_ffn(params, x.astype(self.dtype),
                              activation=self.activation)
    return y.astype(x.dtype), {'losses': {}, 'metrics': {}}
