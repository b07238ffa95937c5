"""Auxiliary router losses, returned UNWEIGHTED; train.py applies coefficients.

Each function takes a RouterOutput for T = B*S tokens (rows in sequence-major
order) and the number of sequences B, and returns a float32 scalar.

  balance       LM "standard" sequence-level loss (algorithms.md §2.3a) with
                count_mode 'all_k', or the VLM Switch loss counting the top-1
                choice only (§2.3c) with count_mode 'top1':
                  mean_b Σ_e η_e (E' f_{b,e}) P̄_{b,e},
                f counts the router's actual choices, P̄ = mean_t probs. A
                balanced router gives 1 (the coefficient α then gives α).
                group 'batch' treats the whole batch as one sequence.
  z_loss        mean_t (logsumexp_e z_t)² (ST-MoE; LibMoE VLM).
  entropy_step  -mean_t H(softmax(z_t))              (LM perplexity_reg 'step')
  entropy_time  -mean_b H(mean_t softmax(z_{b,t}))   ('time')
  entropy_global -H(mean_{b,t} softmax(z))           ('global'; σ-MoE Csordás)
  tc_balance    TC-MoE balance (§3.10, moe_jax form; parity `tc_global_counts`).
  tc_reward     -mean_t Σ_null p_t,n  (TC-MoE reward, pushes mass to null slots).
  remoe_l1      ReMoE load-balanced L1 (§3.11): E/(k N²) Σ_e (Σ_t R_te) #{t: R_te>0};
                under parity `remoe_libmoe`: E² mean(R) nnz/N (D8).

Dimension legend: B sequences, S tokens per sequence, T = B*S, E' router width,
K slots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.moe.routers.base import RouterConfig, RouterOutput

Array = jax.Array

COUNT_MODES = ('all_k', 'top1')
GROUPS = ('sequence', 'batch')


def _per_sequence(a: Array, num_sequences: int) -> Array:
  """[T, ...] -> [B, S, ...]."""
  return a.reshape((num_sequences, -1) + a.shape[1:])


def _choice_counts(choice: Array, width: int) -> Array:
  """[..., K] ids (-1 = inactive) -> [..., E'] counts."""
  return jnp.sum(jax.nn.one_hot(choice, width, dtype=jnp.float32), axis=-2)


def balance(out: RouterOutput, num_sequences: int, *, count_mode: str = 'all_k',
            group: str = 'sequence') -> Array:
  """Sequence-level (or batch-level) load-balancing loss; 1 at perfect balance."""
  if count_mode not in COUNT_MODES:
    raise ValueError(f'balance count_mode: expected one of {COUNT_MODES}, '
                     f'got {count_mode!r}')
  if group not in GROUPS:
    raise ValueError(f'balance group: expected one of {GROUPS}, got {group!r}')
  b = num_sequences if group == 'sequence' else 1
  width = out.probs.shape[-1]
  choice = out.choice if count_mode == 'all_k' else out.choice[:, :1]
  counts = _per_sequence(_choice_counts(choice, width), b)     # [B, S, E']
  # f_{b,e} = count / (S*K): the fraction of the sequence's slots.
  f = jnp.sum(counts, axis=1) / (counts.shape[1] * choice.shape[-1])
  p_mean = jnp.mean(_per_sequence(out.probs.astype(jnp.float32), b), axis=1)
  f = jax.lax.stop_gradient(f)
  return jnp.mean(jnp.sum(out.balance_eta * width * f * p_mean, axis=-1))


def z_loss(out: RouterOutput, num_sequences: int) -> Array:
  del num_sequences
  lse = jax.nn.logsumexp(out.logits.astype(jnp.float32), axis=-1)
  return jnp.mean(lse ** 2)


def _entropy(log_p: Array) -> Array:
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def entropy_step(out: RouterOutput, num_sequences: int) -> Array:
  del num_sequences
  return -jnp.mean(_entropy(jax.nn.log_softmax(out.logits.astype(jnp.float32))))


def _marginal_log(log_p: Array, axis) -> Array:
  """log of the mean of exp(log_p) over `axis`, in log space."""
  n = 1
  for a in (axis if isinstance(axis, tuple) else (axis,)):
    n *= log_p.shape[a]
  return jax.nn.logsumexp(log_p, axis=axis) - jnp.log(n)


def entropy_time(out: RouterOutput, num_sequences: int) -> Array:
  log_p = _per_sequence(jax.nn.log_softmax(out.logits.astype(jnp.float32)),
                        num_sequences)                         # [B, S, E']
  return -jnp.mean(_entropy(_marginal_log(log_p, 1)))


def entropy_global(out: RouterOutput, num_sequences: int) -> Array:
  del num_sequences
  log_p = jax.nn.log_softmax(out.logits.astype(jnp.float32))   # [T, E']
  return -_entropy(_marginal_log(log_p, 0))


def tc_balance(out: RouterOutput, num_sequences: int, *, num_experts: int,
               global_counts: bool = False) -> Array:
  """TC-MoE balance (§3.10): mean_b E Σ_e f_{b,e} (P̄⁺_{b,e} + P̄⁻_{b,e}).

  With global_counts (parity `tc_global_counts`, D7): the batch's global counts
  divided by each row's non-null count, and no factor E.
  """
  e = num_experts
  p = out.probs.astype(jnp.float32)[:, :2 * e]                 # [T, 2E]
  p = p / jnp.sum(p, axis=-1, keepdims=True)
  p_mean = jnp.mean(_per_sequence(p, num_sequences), axis=1)   # [B, 2E]
  p_pair = p_mean[:, :e] + p_mean[:, e:]                       # [B, E]
  nonnull = (out.choice >= 0) & (out.choice < 2 * e)
  base_expert = jnp.where(nonnull, out.choice % e, -1)
  counts = jnp.sum(_per_sequence(_choice_counts(base_expert, e),
                                 num_sequences), axis=1)       # [B, E]
  per_row = jnp.sum(_per_sequence(nonnull, num_sequences), axis=(1, 2))  # [B]
  if global_counts:
    counts = jnp.broadcast_to(jnp.sum(counts, 0, keepdims=True), counts.shape)
    scale = 1.0
  else:
    scale = float(e)
  f = jnp.where(per_row[:, None] > 0,
                counts / jnp.maximum(per_row[:, None], 1), 0.0)
  f = jax.lax.stop_gradient(f)
  return jnp.mean(scale * jnp.sum(f * p_pair, axis=-1))


def tc_reward(out: RouterOutput, num_sequences: int, *,
              num_experts: int) -> Array:
  del num_sequences
  null_mass = jnp.sum(out.probs.astype(jnp.float32)[:, 2 * num_experts:], -1)
  return -jnp.mean(null_mass)


def remoe_l1(out: RouterOutput, num_sequences: int, *, top_k: int,
             libmoe: bool = False) -> Array:
  """ReMoE L1 on the full R = ReLU(logits) [T, E] (before slot truncation)."""
  del num_sequences
  relu = jax.nn.relu(out.logits.astype(jnp.float32))
  n, e = relu.shape
  active = jax.lax.stop_gradient((relu > 0).astype(jnp.float32))
  if libmoe:
    return e * e * jnp.mean(relu) * jnp.sum(active) / n
  return e / (top_k * n * n) * jnp.sum(jnp.sum(relu, 0) * jnp.sum(active, 0))


LOSSES = ('balance', 'z_loss', 'entropy_step', 'entropy_time',
          'entropy_global', 'tc_balance', 'tc_reward', 'remoe_l1')


def compute(names, out: RouterOutput, num_sequences: int, cfg: RouterConfig, *,
            count_mode: str = 'all_k', group: str = 'sequence') -> dict:
  """{name: unweighted loss} for every requested loss name."""
  fns = {
      'balance': lambda: balance(out, num_sequences, count_mode=count_mode,
                                 group=group),
      'z_loss': lambda: z_loss(out, num_sequences),
      'entropy_step': lambda: entropy_step(out, num_sequences),
      'entropy_time': lambda: entropy_time(out, num_sequences),
      'entropy_global': lambda: entropy_global(out, num_sequences),
      'tc_balance': lambda: tc_balance(
          out, num_sequences, num_experts=cfg.num_experts,
          global_counts=cfg.flag('tc_global_counts')),
      'tc_reward': lambda: tc_reward(out, num_sequences,
                                     num_experts=cfg.num_experts),
      'remoe_l1': lambda: remoe_l1(out, num_sequences, top_k=cfg.top_k,
                                   libmoe=cfg.flag('remoe_libmoe')),
  }
  unknown = [n for n in names if n not in fns]
  if unknown:
    raise ValueError(f'losses: expected names among {LOSSES}, got {unknown}')
  return {n: fns[n]() for n in names}
