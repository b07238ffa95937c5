"""Routing metrics over traces, as defined in algorithms.md §9.

Every function takes a trace DataFrame of ONE layer and ONE checkpoint (the
columns of moe_jax/trace.py: sequence, position, domain, choice_<j>,
weight_<j>, optionally top1 and prob_<e>) and returns numbers; nothing here
runs a model.

A slot is "selected" when its choice is >= 0 (the RouterOutput contract:
inactive ReMoE / HyperRouter slots are -1), whatever its weight: MoE++'s
zero experts and TC-MoE's null slots are selections with weight 0. The top-1
of a token is the argmax of the router's full distribution (§9: argmax of
`gate_softmax`): the trace's top1 column, else the argmax of its prob_<e>
columns, else, for traces that have neither, choice_0 (the same for every
router whose selection is its distribution's top-k; DeepSeek-V3's biased
selection may differ). A token routed nowhere (a ReMoE token with every gate
at 0) has no top-1 and no weight distribution: it is left out of the
allocation entropy, weight entropy, router margin and H_total.

Dimension legend: T tokens, K slots, E' router output width.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def _columns(frame: pd.DataFrame, prefix: str) -> list[str]:
  names = [c for c in frame.columns if c.startswith(prefix)]
  return sorted(names, key=lambda c: int(c[len(prefix):]))


def choices(frame: pd.DataFrame) -> np.ndarray:
  """[T, K] selected ids."""
  return frame[_columns(frame, 'choice_')].to_numpy(np.int64)


def weights(frame: pd.DataFrame) -> np.ndarray:
  """[T, K] combine weights."""
  return frame[_columns(frame, 'weight_')].to_numpy(np.float64)


def indicator(frame: pd.DataFrame, width: int) -> np.ndarray:
  """A [T, E'] in {0, 1}: token t selected id e (choice_<j> == e)."""
  c = choices(frame)                                           # [T, K]
  if c.size and c.max() >= width:
    raise ValueError(f"the trace selects id {int(c.max())}, outside the "
                     f"router width E' = {width}")
  a = np.zeros((len(frame), width), np.int64)
  rows = np.repeat(np.arange(len(frame)), c.shape[1])
  active = c.reshape(-1) >= 0
  a[rows[active], c.reshape(-1)[active]] = 1
  return a


def top1(frame: pd.DataFrame) -> np.ndarray:
  """[T] each token's top-1 id (-1: routed nowhere); see the module doc."""
  if 'top1' in frame.columns:
    return frame['top1'].to_numpy(np.int64)
  names = _columns(frame, 'prob_')
  if names:
    p = frame[names].to_numpy(np.float64)
    return np.where(p.max(axis=1) > 0, p.argmax(axis=1), -1)
  return frame['choice_0'].to_numpy(np.int64)


def _entropy(p: np.ndarray) -> np.ndarray:
  """Entropy in nats along the last axis (0 log 0 = 0)."""
  p = np.asarray(p, np.float64)
  logs = np.log(np.where(p > 0, p, 1.0))
  return -np.sum(p * logs, axis=-1)


def selection_frequency(frame: pd.DataFrame, width: int) -> np.ndarray:
  """u [E']: each id's share of all selections (sums to 1)."""
  counts = indicator(frame, width).sum(axis=0).astype(np.float64)
  return counts / max(counts.sum(), 1.0)


def allocation_entropy(frame: pd.DataFrame, width: int) -> float:
  """Mean over sequences of H(h / Σh) / ln E', h the top-1 histogram.

  Sequences whose every token was routed nowhere have no histogram and are
  left out (NaN if that is all of them).
  """
  values = []
  ids = pd.Series(top1(frame), index=frame.index)
  for _, seq in ids.groupby(frame['sequence']):
    routed = seq.to_numpy()[seq.to_numpy() >= 0]
    if routed.size:
      h = np.bincount(routed, minlength=width)
      values.append(_entropy(h / h.sum()) / np.log(width))
  return float(np.mean(values)) if values else float('nan')


def normalised_weights(frame: pd.DataFrame) -> np.ndarray:
  """[T', K] |w_t| / Σ|w_t| of the tokens with some routing weight."""
  w = np.abs(weights(frame))
  total = w.sum(axis=1, keepdims=True)
  routed = total[:, 0] > 0
  return w[routed] / total[routed]


def weight_entropy(frame: pd.DataFrame) -> float:
  """Mean over tokens of H(|w_t| / Σ|w_t|), nats (maximum ln K)."""
  w = normalised_weights(frame)
  return float(np.mean(_entropy(w))) if len(w) else float('nan')


def margins(frame: pd.DataFrame) -> np.ndarray:
  """[T'] w_(1) - w_(2) per token (sorted normalised |weights|); empty
  when the trace has one slot per token (K = 1: no second weight)."""
  w = -np.sort(-normalised_weights(frame), axis=1)
  if w.shape[1] < 2:
    return np.zeros((0,))
  return w[:, 0] - w[:, 1]


def router_margin(frame: pd.DataFrame) -> float:
  """Mean over tokens of w_(1) - w_(2); NaN for K = 1."""
  values = margins(frame)
  return float(np.mean(values)) if values.size else float('nan')


def h_total(frame: pd.DataFrame) -> float:
  """Mean over tokens of the entropy of the full router distribution (nats).

  Needs a trace written with probabilities (--trace_probs).
  """
  names = _columns(frame, 'prob_')
  if not names:
    raise ValueError('h_total needs prob_<e> columns: trace with '
                     '--trace_probs')
  p = frame[names].to_numpy(np.float64)
  total = p.sum(axis=1, keepdims=True)
  routed = total[:, 0] > 0                 # ReMoE: p = 0 routes nowhere
  p = p[routed] / total[routed]            # float16 storage: renormalise
  return float(np.mean(_entropy(p))) if len(p) else float('nan')


def _same_tokens(a: pd.DataFrame, b: pd.DataFrame):
  """Two checkpoints' traces of one layer, both in token order."""
  key = ['sequence', 'position']
  a = a.sort_values(key).reset_index(drop=True)
  b = b.sort_values(key).reset_index(drop=True)
  if not a[key].equals(b[key]):
    raise ValueError('the two traces cover different tokens: trace both '
                     'checkpoints over the same evaluation set')
  return a, b


def _aligned(a: pd.DataFrame, b: pd.DataFrame, width: int):
  a, b = _same_tokens(a, b)
  return indicator(a, width), indicator(b, width)


def change_rate(previous: pd.DataFrame, current: pd.DataFrame,
                width: int) -> float:
  """LM expert change rate, %: 100 - 100 |A_c ∧ A_{c-1}| / |A_{c-1}|."""
  a_prev, a_cur = _aligned(previous, current, width)
  return float(100.0 - 100.0 * np.sum(a_prev & a_cur) / np.sum(a_prev))


def saturation(current: pd.DataFrame, final: pd.DataFrame,
               width: int) -> float:
  """Router saturation, %: 100 |A_c ∧ A_final| / |A_final|."""
  a_cur, a_final = _aligned(current, final, width)
  return float(100.0 * np.sum(a_cur & a_final) / np.sum(a_final))


def switch_fraction(previous: pd.DataFrame, current: pd.DataFrame) -> float:
  """VLM expert change rate (LibMoE's average_switch_fraction): the mean
  over tokens of the fraction of the K slot positions whose id differs
  between two checkpoints. Position-sensitive: a reordering counts."""
  a, b = _same_tokens(previous, current)
  return float(np.mean(choices(a) != choices(b)))              # over [T, K]


def position_match(current: pd.DataFrame, final: pd.DataFrame) -> float:
  """VLM router saturation (LibMoE's average_position_match): the fraction
  of slot positions holding the same id as at the final checkpoint."""
  return 1.0 - switch_fraction(current, final)


def co_activation(frame: pd.DataFrame, width: int) -> np.ndarray:
  """C = Aᵀ A [E', E']: tokens selecting both i and j (diagonal: i)."""
  a = indicator(frame, width)
  return a.T @ a


def load_balance(frame: pd.DataFrame, width: int) -> dict[str, float]:
  """Usage relative perplexity, dead proportion, Jain, CV and max/mean."""
  counts = indicator(frame, width).sum(axis=0).astype(np.float64)
  u = counts / counts.sum()
  return {
      'usage_relative_perplexity': float(np.exp(_entropy(u)) / width),
      'dead_proportion': float(np.mean(counts == 0)),
      'jain_fairness': float(counts.sum() ** 2 /
                             (width * np.sum(counts ** 2))),
      'load_cv': float(np.std(counts) / np.mean(counts)),
      'max_mean_load': float(np.max(counts) / np.mean(counts)),
  }


def per_domain_entropy(frame: pd.DataFrame, width: int) -> pd.Series:
  """Per domain label: H(u_domain) / ln E' of its selection frequency.

  Low values mean the domain's tokens concentrate on few experts
  (specialisation); 1 is uniform use of every expert.
  """
  return frame.groupby('domain').apply(
      lambda part: float(_entropy(selection_frequency(part, width)) /
                         np.log(width)), include_groups=False)


def per_domain_allocation_entropy(frame: pd.DataFrame,
                                  width: int) -> pd.Series:
  """Per domain label: allocation_entropy over that domain's sequences.

  LibMoE's VLM "Expert Allocation Entropy (norm.)" grouped by task (MME
  category): the per-sample top-1 histogram entropy / ln E', averaged over
  the task's samples (algorithms.md §9).
  """
  return frame.groupby('domain').apply(
      lambda part: allocation_entropy(part, width), include_groups=False)


def domain_overlap(frame: pd.DataFrame, width: int) -> pd.DataFrame:
  """[domains x domains] histogram intersection Σ_e min(u_a,e, u_b,e).

  u_d is domain d's selection_frequency in this layer: 1 means two domains
  use the experts in the same proportions, 0 disjoint experts.
  """
  names = sorted(frame['domain'].unique())
  u = np.stack([selection_frequency(frame[frame['domain'] == d], width)
                for d in names])                                # [d, E']
  return pd.DataFrame(layer_overlap(u), index=names, columns=names)


# ------------------------------------------------------ layer similarity ---

def _selected_sets(frame: pd.DataFrame) -> list[frozenset]:
  """Per token (ordered by sequence, position): the set of selected ids."""
  c = choices(frame.sort_values(['sequence', 'position']))
  return [frozenset(row[row >= 0]) for row in c]


def _aligned_sets(a: pd.DataFrame, b: pd.DataFrame):
  key = ['sequence', 'position']
  if not a.sort_values(key)[key].reset_index(drop=True).equals(
      b.sort_values(key)[key].reset_index(drop=True)):
    raise ValueError('the two layers cover different tokens: compare layers '
                     'of one trace (one checkpoint)')
  return _selected_sets(a), _selected_sets(b)


def layer_overlap(frequency: np.ndarray) -> np.ndarray:
  """O [L, L]: histogram intersection Σ_e min(u_l,e, u_m,e) of frequencies.

  Args:
    frequency: [L, E'] selection_frequency of every layer (rows sum to 1).
  """
  u = np.asarray(frequency, np.float64)
  return np.minimum(u[:, None, :], u[None, :, :]).sum(axis=-1)


def universal_score(overlap: np.ndarray) -> float:
  """Mean of O over layer pairs l != m (moe_jax excludes the diagonal)."""
  n = overlap.shape[0]
  return float(overlap[~np.eye(n, dtype=bool)].mean())


def optimist_score(overlap: np.ndarray) -> float:
  """Mean over layers of max_{m != l} O_lm (the row-max score)."""
  masked = np.where(np.eye(overlap.shape[0], dtype=bool), -np.inf, overlap)
  return float(masked.max(axis=1).mean())


def token_jaccard(layer_a: pd.DataFrame, layer_b: pd.DataFrame) -> float:
  """Mean over tokens of |S_a ∩ S_b| / |S_a ∪ S_b| (S: selected ids)."""
  sets_a, sets_b = _aligned_sets(layer_a, layer_b)
  return float(np.mean([len(x & y) / max(len(x | y), 1)
                        for x, y in zip(sets_a, sets_b)]))


def layer_sel_overlap(layer: pd.DataFrame, previous: pd.DataFrame) -> float:
  """Mean over tokens of |S_l ∩ S_{l-1}| / k, k the trace's slots per token."""
  sets, prev = _aligned_sets(layer, previous)
  k = choices(layer).shape[1]
  return float(np.mean([len(x & y) / k for x, y in zip(sets, prev)]))
