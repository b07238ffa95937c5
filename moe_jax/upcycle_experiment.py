"""The sparse-upcycling LM experiment: a Hugging Face dense model, upcycled
and trained further (algorithms.md §10; moe_jax/convert/upcycle.py).

`experiment(router, arg)` is what every `configs/upcycle/<family>_<router>.py`
returns: LibMoE's LM config of `router` (losses, router options, data,
mesh) with `config.init` set to upcycle the model of `--config.init.hf_path`
into E experts, and an upcycling training recipe: a small learning rate
after a short warmup (the model is already trained), and the parameters
that train chosen by `train_only`. The model itself (width, heads,
vocabulary, tokenizer) comes from the HF directory at start-up
(moe_jax/convert/init_from_hf.py), whatever the LibMoE sizes say.

Routers start from N(0, 0.02²) (upcycle.ROUTER_STD, algorithms.md §10.1):
`config.moe.router_options.init_std` is set to it here, replacing the LM
size preset's std, and a `--config.moe.router_options.init_std=S` override
is what the upcycled routers are drawn with.

Config arguments (`file.py:key=value,...`):
  tiny: a CPU run of a few minutes (synthetic data, 4 experts top-2).
  train_only: 'all' (default) | 'moe' (the MoE layers only: experts, shared
    experts and routers; attention, norms and embeddings frozen).
"""

from __future__ import annotations

import ml_collections

from moe_jax import config_lib
from moe_jax import router_recipes
from moe_jax.convert import upcycle

ConfigDict = ml_collections.ConfigDict

# train_only -> train.trainable regexes over parameter paths.
TRAINABLE = {
    'all': ('.*',),
    'moe': (r'layer_\d+/moe/.*',),
}


def experiment(router: str, arg: str | None) -> ConfigDict:
  """The config of `configs/upcycle/<family>_<router>.py:arg`."""
  args = config_lib.parse_arg(arg, tiny=False, train_only='all')
  if args.train_only not in TRAINABLE:
    raise ValueError(f'config arg train_only: expected one of '
                     f'{sorted(TRAINABLE)}, got {args.train_only!r}')
  config = router_recipes.experiment(router, '154m',
                                     'tiny' if args.tiny else None)
  init = config.init
  init.upcycle.router = router
  init.upcycle.num_experts = 4 if args.tiny else 8
  init.upcycle.top_k = 2
  # DeepSeek layouts: one shared expert (the dense MLP), mixed 0.5 / 0.5
  # so the upcycled model computes the dense function at step 0.
  init.upcycle.shared_experts = 1 if router.startswith('deepseek') else 0
  init.upcycle.shared_mix = 'half'
  # Router init N(0, 0.02²) (§10.1, LibMoE std_gate), not the LM size
  # preset's s / sqrt(d): override with --config.moe.router_options.init_std.
  config.moe.router_options.init_std = upcycle.ROUTER_STD
  train = config.train
  # An already trained model: a small peak rate after a short warmup.
  train.learning_rate = 1e-3 if args.tiny else 2e-5
  train.warmup_steps = 10 if args.tiny else 500
  train.steps = 100 if args.tiny else 20_000
  train.eval_every = 50 if args.tiny else 2_000
  train.checkpoint_every = 50 if args.tiny else 2_000
  train.trainable = TRAINABLE[args.train_only]
  return config
