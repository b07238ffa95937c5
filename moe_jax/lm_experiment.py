"""The LibMoE language-model experiment: sizes, init stds and the base config.

`base_config(router, size, arg)` is the experiment every
`configs/<router>_<size>.py` starts from (the router's options and losses are
added by moe_jax/router_recipes.py). Every sub-dict of the resulting
`ml_collections.ConfigDict` is the keyword arguments of one constructor or
one stage (big_vision):

  model_name  the model family in moe_jax/models ('decoder').
  model   TransformerLM kwargs, minus `ffn` (= `moe` or `dense`) and `dtype`
          (= `train.dtype`); see `moe_jax.models.decoder.from_config`.
  moe     MoEBlock kwargs (router, router_options incl. `parity`, backend,
          shared experts, init stds, losses, balance counting); MoE only.
  dense   DenseFFNBlock kwargs of the FLOP-matched dense baseline; dense only.
  loss    `coefficients` {loss name: weight}, `layer_reduction` ('sum' |
          'mean'), and the router step hook's settings (ReMoE: `remoe`).
  train   optimiser, schedule, batch, precision, seed, intervals.
  data    source, paths, tokenizer, packing.
  mesh    device-mesh axis sizes and the logical -> mesh axis rules.

Sizes (algorithms.md §6.1-6.2): '154m' (d 512, L 16, 4 heads x 82) and '660m'
(d 1024, L 18, 4 heads x 128), each with the LibMoE recipe; the `tiny` argument
shrinks any of them to a CPU run of a few minutes on synthetic data. Expert
layouts per family: standard routers 66 experts, top-8, width m = 128 | 256;
DeepSeek 64 experts, top-6, plus a shared expert of width 2m (k m = 2 d in
both, §6.4).

Dimension legend: d model width, L layers, E experts, m expert width, k top-k.
"""

from __future__ import annotations

import math

import ml_collections
from ml_collections import config_dict

from moe_jax import config_lib
from moe_jax.moe import router as router_lib

ConfigDict = ml_collections.ConfigDict

SIZES = ('154m', '660m')

# Architecture and recipe per size (algorithms.md §6.1-6.2).
_SIZE_PRESETS = {
    '154m': dict(d_model=512, num_layers=16, num_heads=4, head_dim=82,
                 expert_width=128, steps=100_000, warmup_steps=0,
                 grad_clip=0.1, eval_every=10_000, checkpoint_every=10_000),
    '660m': dict(d_model=1024, num_layers=18, num_heads=4, head_dim=128,
                 expert_width=256, steps=400_000, warmup_steps=4_000,
                 grad_clip=0.25, eval_every=20_000, checkpoint_every=20_000),
}

# The `tiny` variant: a model and run for a few CPU minutes. k m = d in both
# families, and the DeepSeek family keeps its shape (k - 2 routed + 2m shared).
_TINY = dict(d_model=64, num_layers=2, num_heads=4, head_dim=16,
             expert_width=16, vocab_size=512, seq_len=64, global_batch=8,
             steps=200, log_every=10, eval_every=100, eval_batches=4,
             checkpoint_every=100, keep=2)

# Routers whose LM configs use LibMoE's DeepSeek layout (§3.7-3.8).
DEEPSEEK_ROUTERS = ('deepseek_v2', 'deepseek_v3')

# (num_experts, top_k, shared experts) per family and scale; each shared
# expert has width m, so 2 of them make LibMoE's one 2m-wide shared MLP.
_LAYOUT = {
    ('standard', 'full'): (66, 8, 0),
    ('deepseek', 'full'): (64, 6, 2),
    ('standard', 'tiny'): (16, 4, 0),
    ('deepseek', 'tiny'): (16, 2, 2),
}


# ----------------------------------------------------------------------------
# Sizes and init.

def family(router: str) -> str:
  """'deepseek' for the DeepSeek layouts, 'standard' for every other router."""
  return 'deepseek' if router in DEEPSEEK_ROUTERS else 'standard'


def size_preset(size: str, tiny: bool = False) -> dict:
  """Architecture and recipe numbers of a size (tiny overrides applied)."""
  if size not in _SIZE_PRESETS:
    raise ValueError(f'size: expected one of {SIZES}, got {size!r}')
  preset = dict(_SIZE_PRESETS[size], vocab_size=8000, seq_len=1024,
                global_batch=64, log_every=100, eval_batches=16, keep=3)
  if tiny:
    full_steps, full_warmup = preset['steps'], preset['warmup_steps']
    preset.update(_TINY)
    # Keep the size's warmup fraction (660M: 1%), so its schedule is exercised.
    preset['warmup_steps'] = round(full_warmup / full_steps * _TINY['steps'])
  return preset


def expert_layout(router: str, tiny: bool = False) -> tuple[int, int, int]:
  """(num_experts, top_k, shared_experts) of a router's family."""
  return _LAYOUT[(family(router), 'tiny' if tiny else 'full')]


def libmoe_init_stds(num_layers: int, d_model: int, num_experts: int,
                     expert_width: int, shared_width: int) -> dict:
  """LibMoE LM init stds (algorithms.md §2.1), s = sqrt(2 / L).

  Args:
    num_layers: L.
    d_model: d.
    num_experts: E routed experts.
    expert_width: m.
    shared_width: total width of the shared MLP (LibMoE: 2m).

  Returns:
    {'router', 'w_in', 'w_out', 'shared_w_in', 'shared_w_out'}: router and W1
    s/sqrt(d), W2 s/sqrt(E m), shared W1 s/sqrt(d), shared W2 s/sqrt(2m).
  """
  s = math.sqrt(2.0 / num_layers)
  return {
      'router': s / math.sqrt(d_model),
      'w_in': s / math.sqrt(d_model),
      'w_out': s / math.sqrt(num_experts * expert_width),
      'shared_w_in': s / math.sqrt(d_model),
      'shared_w_out': s / math.sqrt(shared_width),
  }


# ----------------------------------------------------------------------------
# Config building.

def _as_args(arg: str | ConfigDict | None) -> ConfigDict:
  if isinstance(arg, ConfigDict):
    return arg
  return config_lib.parse_arg(arg, tiny=False)


def _train_config(p: dict, tiny: bool) -> ConfigDict:
  train = ConfigDict()
  # Optimiser steps (LibMoE stop_after).
  train.steps = p['steps']
  # Peak learning rate (tiny: 1e-3; at 2.5e-4 a 0.2M model learns slowly).
  train.learning_rate = 1e-3 if tiny else 2.5e-4
  # 'cosine' (to min_lr_ratio * lr) | 'constant'.
  train.schedule = 'cosine'
  # Linear warmup steps before the cosine (660M: 4000).
  train.warmup_steps = p['warmup_steps']
  # Cosine period T_max, counted from the end of warmup (LibMoE: = steps even
  # with warmup). Follows train.steps unless set.
  train.cosine_steps = train.get_ref('steps') * 1
  # Final learning rate as a fraction of the peak.
  train.min_lr_ratio = 0.1
  # AdamW beta1.
  train.b1 = 0.9
  # AdamW beta2.
  train.b2 = 0.999
  # AdamW epsilon.
  train.eps = 1e-8
  # AdamW decoupled weight decay, on all parameters (no exclusion groups).
  train.weight_decay = 0.01
  # Global-norm gradient clipping threshold.
  train.grad_clip = p['grad_clip']
  # Sequences per optimiser step, over all devices and micro-batches.
  train.global_batch = p['global_batch']
  # Tokens per training sequence (each window holds seq_len + 1 tokens).
  train.seq_len = p['seq_len']
  # Micro-batches per optimiser step (one 80 GB GPU at 154M/660M: try 4).
  train.grad_accum = 1
  # Compute dtype of the matmuls: 'float32' | 'bfloat16' | 'float16'.
  train.dtype = 'float32' if tiny else 'bfloat16'
  # Seed of parameter init and of the router rngs.
  train.seed = 42
  # Steps between log lines / metrics.jsonl records.
  train.log_every = p['log_every']
  # Steps between validation runs.
  train.eval_every = p['eval_every']
  # Validation batches of global_batch windows (16 x 64 ~ LibMoE's 1008).
  train.eval_batches = p['eval_batches']
  # Steps between checkpoints.
  train.checkpoint_every = p['checkpoint_every']
  # Most recent checkpoints kept (the best by validation loss is kept too).
  train.keep = p['keep']
  # Stop this process after this optimiser step (0: run to train.steps); the
  # schedule still follows train.steps. For time-sliced jobs and resume tests.
  train.halt_at_step = 0
  # Steps between routing traces of the validation set written during
  # training to <workdir>/traces/step=N (0: never; --mode=trace traces
  # checkpoints afterwards). Single-process runs only.
  train.trace_every = 0
  # Also store each router's full output distribution in those traces.
  train.trace_probs = False
  # Regexes over parameter paths ('layer_0/moe/experts/w_in'); a parameter
  # trains when one matches (big_vision-style). Others get no update.
  train.trainable = ('.*',)
  # Activation rematerialisation of every decoder layer: 'none' | 'full' |
  # 'save_dots' | 'dots_with_no_batch_dims' | 'save_qkv_proj' |
  # 'save_attention_out' (models/decoder.py REMAT_POLICIES); memory per
  # policy: python -m moe_jax.bench.memory --config=...
  train.remat = 'none'
  # The decoder's layer loop: 'unrolled' (params layer_{i}) | 'scan' (one
  # nn.scan over params stacked on a leading 'layers' axis: one layer to
  # compile, not L). Checkpoints of the two do not load into each other.
  train.layer_loop = 'unrolled'
  # dot_product_attention: 'auto' (cuDNN's fused kernel on a GPU in bf16 /
  # fp16 when a start-up probe passes, else XLA) | 'xla' | 'cudnn'.
  train.attention = 'auto'
  # Steps between quick zero-shot evaluations during training (0: never);
  # metrics.jsonl split 'zero_shot' and TensorBoard zero_shot/*. Uses
  # config.eval.data_dir; a multiple of checkpoint_every lets
  # --mode=eval pick the best checkpoint by it (eval.select).
  train.eval_tasks_every = 0
  # The quick subset: task names (as eval.tasks) and items per task group.
  train.eval_tasks = 'blimp,piqa,arc'
  train.eval_tasks_max_examples = 50
  return train


def _eval_config() -> ConfigDict:
  evaluation = ConfigDict()
  # Zero-shot tasks of --mode=eval: 'all' or comma-separated names from
  # eval/tasks (lambada, blimp, cbt, hellaswag, piqa, arc, race, siqa,
  # commonsenseqa).
  evaluation.tasks = 'all'
  # One folder per task, laid out as ../shared/data/lm_eval (hellaswag/ and
  # cbt/ hold the original HellaSwag and CBTest files).
  evaluation.data_dir = 'data/lm_eval'
  # Items scored per task group (0: all); evenly spaced, for quick looks.
  evaluation.max_examples = 0
  # Checkpoint to score: its step, or -1 to let eval.select choose.
  evaluation.step = -1
  # 'newest' | 'best_loss' (validation loss) | 'best_zero_shot' (the
  # average of the quick zero-shot evaluation logged in training).
  evaluation.select = 'newest'
  # Rows per scoring batch (rounded up to a multiple of the devices).
  evaluation.batch_size = 32
  return evaluation


def _init_config() -> ConfigDict:
  init = ConfigDict()
  # Hugging Face model directory to start from ('': LibMoE's random init).
  # Its config.json then defines config.model (moe_jax/convert/
  # init_from_hf.py) and its tokenizer.json the tokenizer.
  init.hf_path = ''
  init.upcycle = ConfigDict()
  # Router of the upcycled MoE layers ('': train the dense model as is).
  init.upcycle.router = ''
  # Routed experts E and experts per token k of the upcycled layers.
  init.upcycle.num_experts = 8
  init.upcycle.top_k = 2
  # Dense-MLP segments per expert set (fine-grained experts: width I / G).
  init.upcycle.granularity = 1
  # Shared experts, each a copy of the dense MLP, and their mix
  # ('half': 0.5 shared + 0.5 routed, function-preserving | 'add').
  init.upcycle.shared_experts = 0
  init.upcycle.shared_mix = 'half'
  # Relative std of noise added to each expert copy (0: exact copies).
  init.upcycle.noise = 0.0
  # Seed of the routers and the noise.
  init.upcycle.seed = 0
  # 'per_layer' router seeds | 'libmoe' (seed 42 in every layer).
  init.upcycle.router_seed = 'per_layer'
  return init


def _data_config(p: dict, tiny: bool, train: ConfigDict) -> ConfigDict:
  seq_len_ref = train.get_ref('seq_len')
  data = ConfigDict()
  # 'files' (text / JSON-lines / Parquet files or dirs) | 'array_record' |
  # 'tfds' | 'synthetic' (built-in multi-domain corpus, no files needed).
  data.source = 'synthetic' if tiny else 'files'
  # Training files: a file, directory or glob (SlimPajama parquet shards).
  data.train_path = '' if tiny else 'data/SlimPajama-627B/train'
  # Validation files, as train_path.
  data.eval_path = '' if tiny else 'data/SlimPajama-627B/validation'
  # TFDS dataset name for source 'tfds' (e.g. 'c4/en:3.0.1').
  data.tfds_name = ''
  # TFDS data_dir ('' : TFDS's default, ~/tensorflow_datasets).
  data.tfds_data_dir = ''
  # TFDS splits of training and validation text.
  data.tfds_train_split = 'train'
  data.tfds_eval_split = 'validation'
  # Documents of plain-text files: 'file' | 'line' | 'paragraph'.
  data.doc_mode = 'file'
  # Text field of JSON-lines / Parquet records.
  data.text_field = 'text'
  # Literal text appended to every document (LibMoE: plain text, not a token).
  data.doc_separator = '<STORY_SEP>'
  # SentencePiece .model to load; '' trains one and caches it in the workdir.
  # For tokenizer_type 'hf': the HF model directory (tokenizer.json).
  data.tokenizer = ''
  # How data.tokenizer is read: 'sentencepiece' | 'hf' (HF model directory).
  data.tokenizer_type = 'sentencepiece'
  # Tokenizer vocabulary size (SentencePiece BPE).
  data.vocab_size = p['vocab_size']
  # Split digits into single tokens when training the tokenizer.
  data.split_digits = True
  # Seed of the window shuffle (LibMoE: 123).
  data.shuffle_seed = 123
  # Seed of the shard order: the sorted files of train_path and of eval_path
  # are each read in the order np.random.default_rng(seed).permutation (LibMoE:
  # 123, algorithms.md §6.3); a trained tokenizer reads the training text in
  # that order. None: sorted order.
  data.shard_seed = 123
  # Tokens per window minus one; tied to train.seq_len.
  data.seq_len = seq_len_ref
  # Cap on training-stream tokens; None or 0: the whole source. Full sizes:
  # (train.steps + 100) x train.global_batch x (train.seq_len + 1), LibMoE's
  # (stop_after + 100) steps of batches (algorithms.md §6.3; its windows
  # overlap by a token, ours hold S + 1 tokens each); it follows overrides
  # of those three fields unless set. Tiny: None (the small synthetic
  # corpus, whole).
  data.max_tokens = config_dict.placeholder(int)
  if not tiny:
    data.get_ref('max_tokens').set(
        (train.get_ref('steps') + 100) * train.get_ref('global_batch') *
        (seq_len_ref + 1))
  # Cap on validation-source tokens; None: all of eval_path.
  data.max_valid_tokens = config_dict.placeholder(int)
  # Token cache directory; '' means <workdir>/cache.
  data.cache_dir = ''
  # Built-in corpus for source 'synthetic' (SyntheticSource kwargs).
  data.synthetic = ConfigDict()
  # Documents in the corpus.
  data.synthetic.num_docs = 4000
  # Generated domains (1..6): arithmetic, animals, reversed, records, ...
  data.synthetic.num_domains = 4
  # Corpus seed.
  data.synthetic.seed = 0
  return data


def _mesh_config() -> ConfigDict:
  mesh = ConfigDict()
  # Data-parallel axis size; -1 takes every device the other axes leave.
  mesh.data = -1
  # Fully-sharded data-parallel axis size (parameters sharded over 'embed').
  mesh.fsdp = 1
  # Expert-parallel axis size (experts sharded over it).
  mesh.expert = 1
  # Tensor-parallel axis size (heads / mlp / vocab sharded over it).
  mesh.tensor = 1
  # Logical axis -> mesh axes (None: replicated).
  mesh.rules = (
      ('batch', ('data', 'fsdp', 'expert')),
      ('seq', None),
      ('embed', 'fsdp'),
      ('heads', 'tensor'),
      ('mlp', 'tensor'),
      ('vocab', 'tensor'),
      ('expert', 'expert'),
      # The stacked [L] axis of train.layer_loop='scan': never sharded.
      ('layers', None),
  )
  return mesh


def _moe_config(router: str, p: dict, tiny: bool, d_model_ref) -> ConfigDict:
  num_experts, top_k, shared = expert_layout(router, tiny)
  m = p['expert_width']
  stds = libmoe_init_stds(p['num_layers'], p['d_model'], num_experts, m,
                          2 * m)
  moe = ConfigDict()
  # Model width d; tied to model.d_model.
  moe.d_model = d_model_ref
  # Routed FFN experts E.
  moe.num_experts = num_experts
  # Experts per token k (HyperRouter: k_max; ReMoE: sets the sparsity target).
  moe.top_k = top_k
  # Hidden width m of each routed expert.
  moe.expert_width = m
  # Routing algorithm, a key of moe_jax.moe.router.ROUTERS.
  moe.router = router
  # Expert FFN activation: 'relu' (LibMoE LM) | 'gelu' | 'gelu_tanh' | 'swiglu'.
  moe.activation = 'relu'
  # Biases in the experts (LibMoE LM experts have none).
  moe.expert_bias = False
  # Grouped-matmul backend: 'auto' (GPU: a start-up probe picks pallas, else
  # the fastest that passes; elsewhere blocked; moe/backend_probe.py) |
  # 'blocked' | 'pallas' | 'ragged_dot' | 'loop'.
  moe.backend = 'blocked' if tiny else 'auto'
  # None: dropless (LibMoE); a number: GShard capacity factor.
  moe.capacity_factor = config_dict.placeholder(float)
  # Shared experts, merged into one always-on MLP (DeepSeek: 2 x m = 2m).
  moe.shared_experts = shared
  # Width of one shared expert; None means expert_width.
  moe.shared_width = config_dict.placeholder(int)
  # 'add' (LM: y + shared) | 'half' (VLM: 0.5 shared + 0.5 routed).
  moe.shared_mix = 'add'
  # Losses the layer computes; each needs a weight in loss.coefficients.
  moe.losses = ('balance',)
  # Balance loss counts 'all_k' selected slots (LM) | 'top1' (VLM Switch).
  moe.balance_count_mode = 'all_k'
  # Balance loss statistics per 'sequence' (LM) | whole 'batch'.
  moe.balance_group = 'sequence'
  # The init stds (these four and router_options.init_std) come from the size
  # preset: set them again when overriding d, L, E or m.
  # Routed W1 init std, s / sqrt(d) with s = sqrt(2 / L) (§2.1).
  moe.w_in_std = stds['w_in']
  # Routed W2 init std, s / sqrt(E m).
  moe.w_out_std = stds['w_out']
  # Shared W1 init std, s / sqrt(d).
  moe.shared_w_in_std = stds['shared_w_in']
  # Shared W2 init std, s / sqrt(2m).
  moe.shared_w_out_std = stds['shared_w_out']
  # RouterConfig fields (moe_jax/moe/routers/base.py); the router's file sets
  # its algorithm options here.
  moe.router_options = ConfigDict()
  # Router weight init std, s / sqrt(d).
  moe.router_options.init_std = stds['router']
  # LibMoE parity flags (algorithms.md §4-5); all off. The router's
  # registry entry lists them with their defects (RouterSpec.parity_flags).
  moe.router_options.parity = ConfigDict(
      {flag: False for flag in router_lib.ROUTERS[router].parity_flags})
  return moe


def set_losses(config: ConfigDict, coefficients: dict[str, float]) -> None:
  """Sets the losses the layer computes and their weights, together."""
  config.moe.losses = tuple(coefficients)
  config.loss.coefficients = ConfigDict(dict(coefficients))


def base_config(router: str, size: str,
                arg: str | ConfigDict | None = None) -> ConfigDict:
  """The LibMoE LM experiment for `router` at `size`, before router options.

  Args:
    router: a key of moe_jax.moe.router.ROUTERS, or 'dense' for the
      FLOP-matched dense baseline (FFN d -> 2d -> d with biases).
    size: '154m' or '660m'.
    arg: the config argument ('tiny', ...), or args already parsed by
      `parse_arg` (they must include `tiny`).

  Returns:
    A ConfigDict with sub-dicts model, moe (or dense), loss, train, data, mesh.
  """
  args = _as_args(arg)
  tiny = bool(args.tiny)
  p = size_preset(size, tiny)
  config = ConfigDict()
  # Model size this config reproduces ('154m' | '660m'); informational.
  config.size = size
  # Model family, a module of moe_jax/models (moe_jax.models.build).
  config.model_name = 'decoder'

  config.train = _train_config(p, tiny)
  config.data = _data_config(p, tiny, config.train)
  config.mesh = _mesh_config()

  model = ConfigDict()
  # Vocabulary size V; tied to data.vocab_size.
  model.vocab_size = config.data.get_ref('vocab_size')
  # Model width d.
  model.d_model = p['d_model']
  # Decoder layers L (an MoE block, or the dense FFN, in every layer).
  model.num_layers = p['num_layers']
  # Attention heads.
  model.num_heads = p['num_heads']
  # Width of one head (154M: 82, so Q/K/V width 328 < d).
  model.head_dim = p['head_dim']
  # True: the dense FFN baseline (`dense` sub-dict) instead of MoE blocks.
  model.dense_ffn = router == 'dense'
  config.model = model

  loss = ConfigDict()
  # {loss name: coefficient}; the layer returns the losses unweighted.
  loss.coefficients = ConfigDict()
  # Cross-layer reduction of each aux loss: 'sum' (LM, LibMoE) | 'mean' (VLM).
  loss.layer_reduction = 'sum'
  config.loss = loss
  config.init = _init_config()
  config.eval = _eval_config()

  if router == 'dense':
    s = math.sqrt(2.0 / p['num_layers'])
    dense = ConfigDict()
    # Model width d; tied to model.d_model.
    dense.d_model = model.get_ref('d_model')
    # FFN width 2d: the active width of every MoE config (§6.4).
    dense.width = 2 * p['d_model']
    # FFN activation (LibMoE preln_rope: ReLU).
    dense.activation = 'relu'
    # FFN biases (LibMoE's dense baseline has them).
    dense.use_bias = True
    # W1 init std sqrt(2 / (L d)) (LibMoE reset_prenorm_params, §2.1).
    dense.w_in_std = s / math.sqrt(p['d_model'])
    # W2 init std sqrt(2 / (L 2d)).
    dense.w_out_std = s / math.sqrt(2 * p['d_model'])
    config.dense = dense
  else:
    config.moe = _moe_config(router, p, tiny, model.get_ref('d_model'))
    # LibMoE "standard" sequence-level balance loss, alpha = 0.01 per layer.
    set_losses(config, {'balance': 0.01})
  return config
