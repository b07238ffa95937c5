"""LibMoE's vision-language experiment: three stages of a LLaVA-style model.

`experiment(router, stage, arg)` is what every
`configs/vlm/<router>_{pt,pft,sft}.py` returns (algorithms.md §10.2, v2):

  pt   pre-training: the dense `mlp2x_gelu` projector alone learns image
       captions (LLaVA-558K, 'plain' template), LR 1e-3, batch 256.
  pft  pre-fine-tuning: everything dense trains (ALLaVA captions, Phi-3.5
       template, 'pad' aspect), LR 2e-6, batch 24.
  sft  visual instruction tuning: every vision-tower MLP and the projector
       become MoE layers upcycled from the PFT weights (E 6, k 3; the LLM
       stays dense), everything trains with the balance (top-1 Switch,
       0.01) and router z (0.001) losses averaged over the tower's layers
       plus the projector's; LLaVA-665K, LR 4e-6, batch 32.

Each stage starts from the previous stage's newest checkpoint
(`init.previous_stage`, a workdir) or, when that is '', from the Hugging
Face directories `init.llm_hf_path` (a dense LLM: Phi-3 / Phi-3.5 / Llama
family) and `init.vision_hf_path` (a SigLIP / CLIP vision model) with a
random projector. 'tiny:<family>' names a tiny random model that
moe_jax/convert/init_vlm.py writes into the workdir first, so a `:tiny`
stage runs on its own on a fresh clone. The model's sizes, the tokenizer
and the image preprocessing come from those directories at start-up.

Config sub-dicts (each the kwargs of one constructor or stage):
  model / dense  the LLM (TransformerLM kwargs and its dense MLP).
  vision         VisionTower kwargs (moe_jax/models/vision.py).
  vlm            tower_ffn / projector_ffn ('dense' | 'moe'), projector
                 width, image token id, S² scales.
  moe            MoEBlock kwargs shared by the tower and projector MoE
                 layers; each site sets its own widths and activation.
  loss, train, data, init, mesh  as in the LM experiment, with the stage's
                 recipe.

Config arguments (`file.py:key=value,...`): tiny (a CPU run of a few
minutes on the built-in shapes set with tiny random HF models).
"""

from __future__ import annotations

import math

import ml_collections
from ml_collections import config_dict

from moe_jax import config_lib
from moe_jax import lm_experiment
from moe_jax import router_recipes

ConfigDict = ml_collections.ConfigDict

STAGES = ('pt', 'pft', 'sft')
# Routers with a shipped VLM config (LibMoE v2's table, algorithms.md §8.2,
# minus MoE++ and TC-MoE, whose zero / signed experts do not preserve the
# upcycled function).
ROUTERS = ('smoe', 'sigmoid', 'xmoe', 'deepseek_v2', 'deepseek_v3')

# Per-stage recipe (algorithms.md §10.2): data, template, aspect, LR, batch,
# one epoch of steps, and what trains.
_RECIPES = {
    'pt': dict(json='data/llava/blip_laion_cc_sbu_558k.json',
               images='data/llava/images', template='plain', aspect='resize',
               learning_rate=1e-3, global_batch=256, steps=2181,
               trainable=('projector/.*',), moe=False),
    'pft': dict(json='data/llava/cumo_pft_allava.json',
                images='data/llava/images', template='phi35', aspect='pad',
                learning_rate=2e-6, global_batch=24, steps=7376,
                trainable=('.*',), moe=False),
    'sft': dict(json='data/llava/llava_v1_5_mix665k.json',
                images='data/llava/images', template='phi35', aspect='pad',
                learning_rate=4e-6, global_batch=32, steps=20791,
                trainable=('.*',), moe=True),
}

# The tiny variant: tiny random HF models, the shapes set, minutes on a CPU.
# Each stage's steps and rate were chosen so the loss falls visibly and the
# SFT model learns the shapes task (tests/train/test_vlm_stages.py).
# seq_len fits a shapes sample: 16 image tokens + a caption (PT), or the
# Phi-3.5 system prompt and two question-answer turns (90 tokens).
_TINY = {
    'pt': dict(learning_rate=3e-3, steps=60, seq_len=64),
    'pft': dict(learning_rate=2e-3, steps=60, seq_len=96),
    'sft': dict(learning_rate=2e-3, steps=120, seq_len=96),
}


def _vlm_config(tiny: bool, moe: bool) -> ConfigDict:
  vlm = ConfigDict()
  # Vision-tower MLPs and the projector: 'dense' | 'moe' (SFT: upcycled).
  vlm.tower_ffn = 'moe' if moe else 'dense'
  vlm.projector_ffn = 'moe' if moe else 'dense'
  # Hidden and output width of the mlp2x_gelu projector; set from the LLM
  # (its d_model) at start-up.
  vlm.projector_width = config_dict.placeholder(int)
  # Token id whose positions take the image features; set from the
  # tokenizer at start-up ('<image>', else one past the vocabulary: such
  # ids are never embedded, as LibMoE's IMAGE_TOKEN_INDEX = -200).
  vlm.image_token_id = config_dict.placeholder(int)
  # S² scales (LibMoE v2: 1,3); each scale s runs s x s crops.
  vlm.s2_scales = (1,) if tiny else (1, 3)
  return vlm


def _vision_config() -> ConfigDict:
  # VisionTower kwargs, filled from init.vision_hf_path's config.json at
  # start-up (moe_jax/convert/init_vlm.py); listed so overrides are checked.
  vision = ConfigDict()
  for name in ('kind', 'image_size', 'patch_size', 'num_channels', 'd_model',
               'num_layers', 'num_heads', 'mlp_width', 'activation',
               'norm_eps'):
    vision[name] = config_dict.placeholder(
        str if name in ('kind', 'activation') else
        float if name == 'norm_eps' else int)
  # HF hidden_states index of the features (LLaVA: -2, the penultimate
  # layer; all layers still run, as in LibMoE).
  vision.feature_layer = -2
  # 'patch' (drop CLIP's class token; LLaVA 'default') | 'full'.
  vision.feature_select = 'patch'
  return vision


def _init_config(tiny: bool) -> ConfigDict:
  init = ConfigDict()
  # Workdir of the previous stage, whose newest checkpoint this stage starts
  # from ('': start from the HF directories below).
  init.previous_stage = ''
  # Dense LLM directory (Phi-3 / Phi-3.5 / Llama family) or 'tiny:phi3'.
  init.llm_hf_path = 'tiny:phi3' if tiny else ''
  # Vision model directory (SigLIP / CLIP) or 'tiny:siglip' | 'tiny:clip'.
  init.vision_hf_path = 'tiny:siglip' if tiny else ''
  init.upcycle = ConfigDict()
  # Relative std of noise added to each expert copy (LibMoE: exact copies).
  init.upcycle.noise = 0.0
  # Seed of the routers (and the noise).
  init.upcycle.seed = 0
  # 'libmoe' (every router from seed 42, LibMoE's init_gate_weights) |
  # 'per_layer'.
  init.upcycle.router_seed = 'libmoe'
  return init


def _data_config(recipe: dict, tiny: bool, seq_len_ref) -> ConfigDict:
  data = ConfigDict()
  # 'llava': LLaVA-format conversations + an image folder.
  data.source = 'llava'
  # Training conversations (LLaVA JSON) or 'tiny:shapes' (the built-in
  # coloured-shapes set, written into the workdir).
  data.train_path = 'tiny:shapes' if tiny else recipe['json']
  # Validation conversations ('' : none; tiny: the shapes set's own).
  data.eval_path = ''
  # Folder the samples' `image` fields are relative to.
  data.image_dir = '' if tiny else recipe['images']
  # Conversation template: 'plain' (PT captions) | 'phi35'.
  data.template = recipe['template']
  # Image aspect: 'resize' (the processor's own) | 'pad' (LLaVA
  # expand2square onto the mean colour, PFT / SFT).
  data.image_aspect = recipe['aspect']
  # Over-long samples: 'error' | 'skip' (counted and logged).
  data.too_long = 'error' if tiny else 'skip'
  # Tokenizer (HF directory) and vocabulary: the LLM's, set at start-up.
  data.tokenizer_type = 'hf'
  data.tokenizer = ''
  data.vocab_size = config_dict.placeholder(int)
  # Image preprocessing: the tower directory's preprocessor_config.json.
  data.image_processor = ''
  # Tokens per sample (right-padded); tied to train.seq_len.
  data.seq_len = seq_len_ref
  # Seed of the shuffle and of the length-grouped batching.
  data.shuffle_seed = 123
  # Samples of the built-in shapes set (data.train_path='tiny:shapes').
  data.shapes = ConfigDict(dict(num_train=512, num_eval=64, image_size=32,
                                seed=0))
  return data


def experiment(router: str, stage: str, arg: str | None) -> ConfigDict:
  """The config of `configs/vlm/<router>_<stage>.py:arg`."""
  if router not in ROUTERS:
    raise ValueError(f'router: expected one of {ROUTERS}, got {router!r}')
  if stage not in STAGES:
    raise ValueError(f'stage: expected one of {STAGES}, got {stage!r}')
  args = config_lib.parse_arg(arg, tiny=False)
  tiny = bool(args.tiny)
  recipe = dict(_RECIPES[stage], **(_TINY[stage] if tiny else {}))
  # The router's LM recipe supplies its router options (sigmoid
  # renormalisation, XMoE's low-rank width, DeepSeek-V3's bias rate, ...).
  lm = router_recipes.experiment(router, '154m', 'tiny' if tiny else None)
  config = ConfigDict()
  # Model family (moe_jax/models/llava.py) and stage; informational.
  config.model_name = 'llava'
  config.stage = stage

  train = lm.train
  train.learning_rate = recipe['learning_rate']
  train.steps = recipe['steps']
  # HF's get_cosine_schedule_with_warmup, as LLaVA trains: linear warmup over
  # ceil(3% of the steps) (TrainingArguments' warmup_ratio), then a cosine
  # over the remaining steps down to 0, no weight decay, clip 1. (The LM
  # recipe's period is all the steps, LibMoE's LM quirk, §6.2.)
  train.warmup_steps = max(1, math.ceil(0.03 * recipe['steps']))
  train.cosine_steps = train.get_ref('steps') - train.get_ref('warmup_steps')
  train.min_lr_ratio = 0.0
  train.weight_decay = 0.0
  train.grad_clip = 1.0
  train.global_batch = 8 if tiny else recipe['global_batch']
  train.seq_len = recipe['seq_len'] if tiny else 2048
  train.dtype = 'float32' if tiny else 'bfloat16'
  train.remat = 'none' if tiny else 'full'
  train.trainable = recipe['trainable']
  train.log_every = 10 if tiny else 50
  train.eval_every = recipe['steps']
  train.eval_batches = 2 if tiny else 16
  train.checkpoint_every = recipe['steps'] if tiny else 2000
  train.keep = 1 if tiny else 3
  # LM-only options, off: zero-shot text tasks and routing traces of text.
  train.eval_tasks_every = 0
  train.trace_every = 0
  config.train = train

  config.data = _data_config(recipe, tiny, train.get_ref('seq_len'))
  config.mesh = lm.mesh
  config.init = _init_config(tiny)

  # The LLM: filled from init.llm_hf_path's config.json at start-up.
  model = ConfigDict()
  for name in ('vocab_size', 'd_model', 'num_layers', 'num_heads',
               'head_dim'):
    model[name] = config_dict.placeholder(int)
  # The LLM stays dense in every stage (LibMoE).
  model.dense_ffn = True
  config.model = model
  config.dense = ConfigDict()
  config.vision = _vision_config()
  config.vlm = _vlm_config(tiny, recipe['moe'])

  moe = lm.moe
  moe.num_experts, moe.top_k = (4, 2) if tiny else (6, 3)
  # DeepSeek layouts: one of the E experts is shared (the dense MLP), mixed
  # 0.5 / 0.5 with the k - 1 routed ones (LibMoE VLM, §2.2).
  shared = router.startswith('deepseek')
  moe.shared_experts = 1 if shared else 0
  moe.shared_mix = 'half'
  if shared:
    moe.num_experts -= 1
    moe.top_k -= 1
  # Widths and activation are each site's (tower MLP, projector); these
  # hold the tower's, set at start-up.
  moe.expert_bias = True
  moe.shared_width = None
  moe.balance_count_mode = 'top1'
  moe.balance_group = 'sequence'
  moe.router_options.init_std = 0.02
  if router == 'xmoe':
    # The VLM draws XMoE's expert embeddings from N(0, 0.02²), the LM an
    # orthogonal matrix (algorithms.md §3.3).
    moe.router_options.xmoe_embed_init = 'normal'
  if router == 'deepseek_v3':
    # LibMoE's VLM smoe_sharev3 has no bias-based balancing (§3.8); its
    # balance loss sees the normalised σ, not softmax (defect D5b fixed).
    moe.router_options.bias_update_rate = 0.0
  config.moe = moe
  config.loss = lm.loss
  config.loss.layer_reduction = 'mean'
  # LibMoE sft.sh: balance 0.01 (top-1 Switch), router z-loss 0.001; the
  # dense stages have no router, so no aux loss.
  lm_experiment.set_losses(
      config, {'balance': 0.01, 'z_loss': 0.001} if recipe['moe'] else {})
  return config
