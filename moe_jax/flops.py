"""Model FLOPs per token and peak device throughput, for MFU.

Training FLOPs per token = 6 N_active + 12 L H Dh S (PaLM, arXiv 2204.02311
App. B), where N_active counts the matmul weights a token touches: attention
projections, router, k routed experts, shared experts and the output layer;
embeddings are a lookup. MFU counts active expert FLOPs only (performance.md,
reporting rules). For MoE++, TC-MoE and ReMoE the k experts are an upper
bound: a slot on a zero / copy / constant / null expert costs no FFN FLOPs,
and ReMoE's active count varies per token, so their MFU is overstated by the
share of such slots (their `expert_load` metric shows it per layer).
"""

from __future__ import annotations

from typing import Any

# Dense bf16 peak per device kind (performance.md: 989 TFLOP/s on H100/H200).
PEAK_BF16_FLOPS = {
    'H100': 989e12,
    'H200': 989e12,
    'A100': 312e12,
}


def active_matmul_params(config: Any) -> int:
  """N_active of `config` (see module docstring)."""
  model = config.model
  d, heads, head_dim = model.d_model, model.num_heads, model.head_dim
  attention = 4 * d * heads * head_dim           # Q, K, V, out
  if model.dense_ffn:
    ffn = 2 * d * config.dense.width
  else:
    moe = config.moe
    mult = 3 if moe.activation == 'swiglu' else 2
    shared_width = moe.shared_experts * (moe.shared_width or moe.expert_width)
    ffn = (d * moe.num_experts                     # router
           + moe.top_k * mult * d * moe.expert_width
           + mult * d * shared_width)
  return model.num_layers * (attention + ffn) + d * model.vocab_size


def train_flops_per_token(config: Any) -> float:
  """6 N_active + 12 L H Dh S."""
  model = config.model
  attention = (12 * model.num_layers * model.num_heads * model.head_dim
               * config.train.seq_len)
  return 6.0 * active_matmul_params(config) + attention


def peak_flops(device_kind: str) -> float | None:
  """bf16 dense peak of a device kind ('NVIDIA H100 80GB HBM3'), or None."""
  for name, peak in PEAK_BF16_FLOPS.items():
    if name in device_kind:
      return peak
  return None
