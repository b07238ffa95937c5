"""Each router's LM recipe, shared by its `configs/<router>_<size>.py` files.

`experiment(router, size, arg)` = `lm_experiment.base_config` (architecture,
training recipe, data, mesh of the size) + the router's options and losses
below. The 154M and 660M files of a router differ only in `size`, so the
options live here once; each config file keeps its docstring (command,
hardware, expected result, arguments).

Every recipe takes (config, args): args holds `tiny` plus the router's own
config arguments (ARGS).
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections
from ml_collections import config_dict

from moe_jax import config_lib
from moe_jax import lm_experiment

ConfigDict = ml_collections.ConfigDict


def _bad_preset(args, *expected: str):
  raise ValueError(f'config arg preset: expected one of {expected}, got '
                   f'{args.preset!r}')


def smoe(config: ConfigDict, args: ConfigDict) -> None:
  # LibMoE SMoE: p = softmax(z), top-k, renormalised; the standard balance
  # loss (alpha 0.01 per layer, summed) comes from base_config.
  if args.demo:
    # LibMoE's demo yaml stops (and anneals) after 1,000 steps.
    config.train.steps = 1000
    config.train.eval_every = 1000
    config.train.checkpoint_every = 1000


def sigmoid(config: ConfigDict, args: ConfigDict) -> None:
  options = config.moe.router_options
  # p = σ(z), top-k, g = renorm(p, S) (LibMoE v2); the balance loss sees the
  # normalised sigmoid p / Σ p.
  options.normalize_topk = True
  # Probability of dropping a (token, expert) score before top-k in training.
  options.expert_dropout = 0.0
  # Router weight init: 'normal' (LibMoE) | 'renorm_keep_std' (Csordás).
  options.router_init = 'normal'
  if args.preset == 'sigma_moe_csordas':
    options.normalize_topk = False
    options.expert_dropout = 0.1
    options.router_init = 'renorm_keep_std'
    # -H(mean over the whole batch of softmax(z)), gamma 0.001 (§2.3b
    # 'global'), instead of the standard balance loss.
    lm_experiment.set_losses(config, {'entropy_global': 0.001})
  elif args.preset != 'libmoe':
    _bad_preset(args, 'libmoe', 'sigma_moe_csordas')


def xmoe(config: ConfigDict, args: ConfigDict) -> None:
  del args
  options = config.moe.router_options
  # Softmax temperature tau: p = softmax(1.5 cos / 0.3) (LibMoE).
  options.temperature = 0.3
  # Low-rank routing dimension; None means E / 2 (LibMoE: 33).
  options.xmoe_dim = config_dict.placeholder(int)
  # Expert-embedding init: 'orthogonal' with gain 0.32 (LM) | 'normal' (VLM).
  options.xmoe_embed_init = 'orthogonal'
  # Norm the expert embeddings are projected to after every optimiser step.
  options.xmoe_embed_norm = 1.5


def _cosine_router_init(options: ConfigDict) -> None:
  # Router init: the LM stack's N(0, s^2/d) ('normal'); 'torch_default' is
  # LibMoE v1.1's U(-1/sqrt(d), 1/sqrt(d)) with a random bias (D10b).
  options.router_init = 'normal'


def cosine(config: ConfigDict, args: ConfigDict) -> None:
  del args
  options = config.moe.router_options
  # Logits cos(x, w_e) / tau + b_e; tau 0.2 gives XMoE's logit scale (1.5/0.3).
  options.temperature = 0.2
  _cosine_router_init(options)


def perturbed_cosine(config: ConfigDict, args: ConfigDict) -> None:
  del args
  options = config.moe.router_options
  # Logits <x, w_e> / ((|x| + theta)(|w_e| + theta)) / tau + b_e.
  options.temperature = 0.2
  # Norm offsets theta_x = theta_w (LibMoE v1.1: 0.1).
  options.cosine_theta = 0.1
  _cosine_router_init(options)


def hyper(config: ConfigDict, args: ConfigDict) -> None:
  del args
  options = config.moe.router_options
  # k schedule: k grows linearly from hyper_k_min to top_k (= k_max) over
  # total_steps; evaluation uses k_max. k_min = k_max / 2 as in LibMoE v1.1
  # (1 -> 2) and the HyperRouter scripts (8 -> 16). Follows moe.top_k unless
  # set.
  options.hyper_k_min = config.moe.get_ref('top_k') // 2
  # Steps of the k schedule; follows train.steps unless set.
  options.total_steps = config.train.get_ref('steps') * 1
  # Hypernetwork hidden width; None means d / 4.
  options.hyper_hidden = config_dict.placeholder(int)
  # HyperRouter trains with no auxiliary loss (LibMoE: aux = 0).
  lm_experiment.set_losses(config, {})


def deepseek_v2(config: ConfigDict, args: ConfigDict) -> None:
  # LibMoE SharedE-V2: softmax top-6 of 64 routed experts, renormalised, plus
  # an always-on shared MLP of width 2m added with weight 1 (the layout and the
  # standard balance loss come from base_config).
  del config, args


def deepseek_v3(config: ConfigDict, args: ConfigDict) -> None:
  options = config.moe.router_options
  # s = σ(z); selection on s + b; weights from the unbiased s, renormalised.
  # Aux-loss-free bias update rate gamma (0 disables the bias).
  options.bias_update_rate = 0.001
  # Expert groups and groups kept (1 / 1: no group limit).
  options.n_group = args.n_group
  options.topk_group = args.topk_group
  # Scale of the routed weights (DeepSeek-V3 2.5; LibMoE never applied it).
  options.routed_scaling_factor = 1.0
  # Complementary sequence-wise balance loss on s / Σ s; paper alpha 0.0001
  # (uncertain, algorithms.md §3.8).
  lm_experiment.set_losses(config, {'balance': 0.0001})
  if args.preset == 'sharede_v3_libmoe':
    options.bias_update_rate = 0.0
    lm_experiment.set_losses(config, {'balance': 0.01})
  elif args.preset != 'deepseek_v3_full':
    _bad_preset(args, 'deepseek_v3_full', 'sharede_v3_libmoe')


def moe_plus_plus(config: ConfigDict, args: ConfigDict) -> None:
  options = config.moe.router_options
  # Zero-computation experts beside the E FFN experts (router width E + 8).
  options.n_zero = 1
  options.n_copy = 1
  options.n_const = 6
  # Router depth 1 (linear) | 2 (Linear-Tanh-Linear, the reference).
  options.router_depth = 1
  # Gating residual z^l = W x + G z^(l-1) from the previous MoE layer.
  options.gate_residual = True
  # Selected zero experts: 'drop' their weight (reference) | 'keep' (LibMoE
  # VLM).
  options.zero_weight_mode = 'drop'
  # Heterogeneous balance weight tau of the zero-computation experts.
  options.hetero_tau = 0.75
  if args.preset == 'reference':
    options.n_const = 2
    options.router_depth = 2
  elif args.preset != 'libmoe':
    _bad_preset(args, 'libmoe', 'reference')


def tc_moe(config: ConfigDict, args: ConfigDict) -> None:
  del args
  options = config.moe.router_options
  # Null slots of the router (width 2E + num_null); LibMoE: num_null = k.
  options.num_null = config.moe.get_ref('top_k') * 1
  # Logit offsets of the negative copies and of the null slots.
  options.tc_neg_offset = -1.0
  options.tc_null_offset = -10.0
  # Balance over both signs with per-sequence counts x E (alpha 0.01), and the
  # null-slot reward -mean null mass at LibMoE's 1e-5 (model card: 0).
  lm_experiment.set_losses(config, {'tc_balance': 0.01, 'tc_reward': 1e-5})


def remoe(config: ConfigDict, args: ConfigDict) -> None:
  del args
  # Slots per token for the active experts; None means min(2k, E). Overflow
  # is reported as remoe_overflow_frac / remoe_dropped_mass.
  config.moe.router_options.remoe_max_active = config_dict.placeholder(int)
  # Load-balanced L1 on R = ReLU(z); the train loop multiplies it by the
  # adaptive lambda below (so its coefficient stays 1).
  lm_experiment.set_losses(config, {'remoe_l1': 1.0})
  # Adaptive lambda, one scalar for all layers, updated once per step from the
  # step's zero fraction S: lambda *= alpha if S < 1 - k/E, else lambda /= alpha
  # (thu-ml/ReMoE; no clamp).
  config.loss.remoe = ConfigDict()
  # Initial lambda (ReMoE moe_relu_l1_reg_coeff_init).
  config.loss.remoe.lambda0 = 1e-8
  # Multiplier alpha (ReMoE moe_relu_l1_reg_coeff_multiplier).
  config.loss.remoe.alpha = 1.2


def dense(config: ConfigDict, args: ConfigDict) -> None:
  # The FFN of every layer is DenseFFNBlock(**config.dense), width 2d: the
  # active FFN width of every MoE config (algorithms.md §6.4); no aux losses.
  del config, args


RECIPES: dict[str, Callable[[ConfigDict, ConfigDict], None]] = {
    'smoe': smoe, 'sigmoid': sigmoid, 'xmoe': xmoe, 'cosine': cosine,
    'perturbed_cosine': perturbed_cosine, 'hyper': hyper,
    'deepseek_v2': deepseek_v2, 'deepseek_v3': deepseek_v3,
    'moe_plus_plus': moe_plus_plus, 'tc_moe': tc_moe, 'remoe': remoe,
    'dense': dense,
}

# Config arguments (`file.py:key=value`) of each router, beside `tiny`.
ARGS: dict[str, dict[str, Any]] = {
    'smoe': dict(demo=False),
    'sigmoid': dict(preset='libmoe'),
    'deepseek_v3': dict(preset='deepseek_v3_full', n_group=1, topk_group=1),
    'moe_plus_plus': dict(preset='libmoe'),
}


def experiment(router: str, size: str, arg: str | None) -> ConfigDict:
  """The config of `configs/<router>_<size>.py:arg`."""
  if router not in RECIPES:
    raise ValueError(f'router: expected one of {sorted(RECIPES)}, got '
                     f'{router!r}')
  args = config_lib.parse_arg(arg, tiny=False, **ARGS.get(router, {}))
  config = lm_experiment.base_config(router, size, args)
  RECIPES[router](config, args)
  return config
