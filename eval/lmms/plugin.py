"""lmms-eval (0.7.3) model 'moe_jax_vlm': a moe_jax VLM checkpoint behind
lmms-eval's simple-model API (`lmms_eval.api.model.lmms`, is_simple=True).

Requests go to eval/vlm_scorer.py's VLMScorer, which runs the JAX Llava
model (moe_jax/models/llava.py): `loglikelihood` (multiple-choice and
perplexity tasks) and greedy `generate_until`.

Registration: the entry point `lmms_eval.models: moe_jax_vlm =
eval.lmms:manifests` (setup.cfg; active once moe_jax is pip-installed)
makes the name known to lmms-eval's CLI and simple_evaluate. Importing
this module also registers it (in lmms-eval's model registry v2 and, with
`@register_model`, in the legacy api.registry), for an environment where
the package metadata is older than setup.cfg.

Python:

  from lmms_eval import evaluator
  from lmms_eval.tasks import TaskManager
  from eval.lmms import plugin
  lm = plugin.MoEJaxVLM(workdir=W, batch_size=8)   # or .from_scorer(s)
  results = evaluator.simple_evaluate(
      model=lm, tasks=[{'task': 'vlm_shapes', 'dataset_path': D}],
      task_manager=TaskManager(include_path='eval/lmms_tasks'))

Command line (offline: export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1):

  lmms-eval --model moe_jax_vlm --model_args workdir=W,batch_size=8 \\
      --include_path eval/lmms_tasks --tasks vlm_shapes --output_path out/

model_args: workdir (required), step (default: the newest checkpoint),
batch_size (rows per scoring batch; wins over --batch_size), max_len
(default: the run's data.seq_len), max_new_tokens (default of
generate_until, 128), loglikelihood ('logprob' | 'loss', below), progress.

What loglikelihood returns. lmms-eval's API documents (logprob,
is_greedy), the sum of log p over the continuation, which is the default
here (as lm-eval and the native scorer). lmms-eval's own LLaVA-family
models return the mean token loss instead, and its built-in
`multiple_choice` scoring picks the option with the SMALLEST value
(api/task.py `np.argmin(lls)`, issue EvolvingLMMs-Lab/lmms-eval#370); for
those built-in tasks pass `loglikelihood=loss` (the mean negative log p
over the continuation's tokens, what those models return). The local task
eval/lmms_tasks/shapes scores logprobs with its own process_results.

Each sample holds at most one image (the model's contract); a document
with more images, or with a video, is an error that names it. Text-only
documents are scored without an image. lmms-eval sees one process (rank
0 of 1); run it once, JAX shards each batch over the local devices.
"""

from __future__ import annotations

import logging
from typing import Any

# Imported first: lmms_eval.models builds its registry on import.
import lmms_eval.models
from lmms_eval import utils as lmms_utils
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model
from PIL import Image

from eval import lmms as lmms_package
from eval import vlm_scorer as vlm_scorer_lib

logger = logging.getLogger(__name__)

MODEL_NAME = lmms_package.MODEL_NAME
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_NEW_TOKENS = 128
LOGLIKELIHOOD_MODES = ('logprob', 'loss')
# gen_kwargs that only shape sampling; ignored under greedy decoding.
_SAMPLING_ONLY = ('temperature', 'top_p', 'top_k', 'min_p', 'typical_p',
                  'seed', 'repetition_penalty')


def _as_int(value: Any, field: str, *, allow_none: bool = True
            ) -> int | None:
  """An int from a model_args value (str, int or None)."""
  if value is None or (isinstance(value, str) and
                       value.strip().lower() in ('', 'none')):
    if allow_none:
      return None
    raise ValueError(f'moe_jax_vlm: {field}: a value is required')
  if isinstance(value, bool):
    raise ValueError(f'moe_jax_vlm: {field}={value!r}: expected an integer')
  try:
    number = int(str(value).strip()) if isinstance(value, str) else int(value)
  except ValueError:
    raise ValueError(f'moe_jax_vlm: {field}={value!r}: expected an '
                     'integer') from None
  if not isinstance(value, str) and number != value:
    raise ValueError(f'moe_jax_vlm: {field}={value!r}: expected an integer')
  return number


def _batch_size(value: Any) -> int | None:
  """Rows per batch: an int, None or 'auto[:N]' (-> None, the default)."""
  if isinstance(value, str) and value.strip().lower().startswith('auto'):
    return None
  number = _as_int(value, 'batch_size')
  if number is not None and number < 1:
    raise ValueError(f'moe_jax_vlm: batch_size={value!r}: expected a '
                     'positive integer')
  return number


def _as_bool(value: Any) -> bool:
  return str(value).strip().lower() not in ('false', '0', 'no', 'none', '')


@register_model(MODEL_NAME)
class MoEJaxVLM(lmms):
  """A moe_jax VLM checkpoint (through a VLMScorer) as an lmms-eval model.

  Attributes:
    scorer: the eval.vlm_scorer.VLMScorer that encodes and scores.
  """

  is_simple = True

  def __init__(self, workdir: str | None = None, step: Any = None,
               batch_size: Any = None, max_len: Any = None, *,
               scorer: vlm_scorer_lib.VLMScorer | None = None,
               max_new_tokens: Any = DEFAULT_MAX_NEW_TOKENS,
               loglikelihood: str = 'logprob', progress: Any = False,
               max_batch_size: Any = None, device: Any = None, **unused):
    """Built from lmms-eval's model_args, or around a VLMScorer.

    Args:
      workdir: the moe_jax VLM run directory.
      step: the checkpoint step (default: the newest).
      batch_size: rows per scoring batch (default 8).
      max_len: the longest input row (default: config.data.seq_len).
      scorer: an existing VLMScorer instead of a workdir (from_scorer);
        then step, batch_size and max_len must be unset.
      max_new_tokens: generate_until's default when a task sets none.
      loglikelihood: 'logprob' (sum of log p, the API's contract) |
        'loss' (mean negative log p, lmms-eval's LLaVA models; see the
        module docstring).
      progress: show the scorer's progress bars (workdir only).
      max_batch_size, device, unused: passed by lmms-eval; ignored (JAX
        places the model on its devices; set JAX_PLATFORMS to choose).
    """
    super().__init__()
    del max_batch_size
    if unused:
      logger.warning('moe_jax_vlm: model_args %s ignored', sorted(unused))
    if device is not None:
      logger.info('moe_jax_vlm: device=%r ignored; JAX uses its default '
                  'devices', device)
    if (workdir is None) == (scorer is None):
      raise ValueError('moe_jax_vlm: give exactly one of model_args '
                       'workdir=<moe_jax VLM run directory> or scorer=<a '
                       'VLMScorer>')
    if scorer is None:
      batch = _batch_size(batch_size)
      scorer = vlm_scorer_lib.VLMScorer.from_workdir(
          str(workdir), step=_as_int(step, 'step'),
          batch_size=DEFAULT_BATCH_SIZE if batch is None else batch,
          max_len=_as_int(max_len, 'max_len'), progress=_as_bool(progress))
    elif (any(v is not None for v in (step, max_len)) or
          _batch_size(batch_size) not in (None, scorer.batch_size)):
      raise ValueError('moe_jax_vlm: step, batch_size and max_len come from '
                       'the given scorer; leave them unset')
    if loglikelihood not in LOGLIKELIHOOD_MODES:
      raise ValueError(f'moe_jax_vlm: loglikelihood={loglikelihood!r}: '
                       f'expected one of {LOGLIKELIHOOD_MODES}')
    self.scorer = scorer
    self.loglikelihood_mode = loglikelihood
    self.max_new_tokens = _as_int(max_new_tokens, 'max_new_tokens',
                                  allow_none=False)
    if self.max_new_tokens < 1:
      raise ValueError(f'moe_jax_vlm: max_new_tokens={max_new_tokens!r}: '
                       'expected at least 1')

  @classmethod
  def from_scorer(cls, scorer: vlm_scorer_lib.VLMScorer, **kwargs
                  ) -> 'MoEJaxVLM':
    """The model around an existing VLMScorer (tests, notebooks)."""
    return cls(scorer=scorer, **kwargs)

  @classmethod
  def create_from_arg_string(cls, arg_string: str,
                             additional_config: dict | None = None
                             ) -> 'MoEJaxVLM':
    """model_args win over the harness's settings (the CLI passes
    batch_size beside model_args; lmms-eval's merge fails on a repeat)."""
    args = lmms_utils.simple_parse_args_string(arg_string)
    extra = {k: v for k, v in (additional_config or {}).items()
             if v is not None and k not in args}
    return cls(**args, **extra)

  @property
  def batch_size(self) -> int:
    return self.scorer.batch_size

  # Requests -> scorer inputs.

  def _doc(self, task: str, split: str, doc_id: int):
    try:
      return self.task_dict[task][split][doc_id]
    except KeyError:
      raise KeyError(f'moe_jax_vlm: no document {doc_id} of task {task!r} '
                     f'split {split!r} (lmms-eval fills task_dict before '
                     'calling the model)') from None

  def _image(self, doc_to_visual, task: str, split: str, doc_id: int
             ) -> Image.Image | None:
    """The document's one image (None: text only)."""
    if doc_to_visual is None:
      return None
    visuals = doc_to_visual(self._doc(task, split, doc_id)) or []
    flat = []
    for visual in visuals:
      flat.extend(visual if isinstance(visual, (list, tuple)) else [visual])
    if not flat:
      return None
    if len(flat) > 1:
      raise ValueError(f'moe_jax_vlm: task {task!r} document {doc_id}: '
                       f'{len(flat)} visuals; the model takes at most one '
                       'image per sample')
    if not isinstance(flat[0], Image.Image):
      raise ValueError(f'moe_jax_vlm: task {task!r} document {doc_id}: a '
                       f'{type(flat[0]).__name__} visual ({flat[0]!r:.80}); '
                       'the model takes PIL images only (no video or audio)')
    return flat[0]

  # Log-likelihoods.

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    """(logprob, is_greedy) of each request's continuation after its
    context and image ('loss' mode: (mean -log p, is_greedy)).

    Request args: (context, continuation or doc_to_target, doc_to_visual,
    doc_id, task, split); lmms-eval's unconditional mutual-information
    requests are (context, continuation), scored without an image.
    """
    inputs = []
    for request in requests:
      args = request.args
      if len(args) == 2:
        inputs.append((None, args[0], args[1]))
        continue
      context, target, doc_to_visual, doc_id, task, split = args
      if not isinstance(target, str):
        target = target(self._doc(task, split, doc_id))
        if isinstance(target, (list, tuple)):
          target = target[0]
        target = str(target)
      inputs.append((self._image(doc_to_visual, task, split, doc_id),
                     context, target))
    scores = self.scorer.loglikelihood(inputs, desc='lmms loglikelihood')
    out = []
    for request, (_, context, continuation), (logprob, greedy) in zip(
        requests, inputs, scores, strict=True):
      if self.loglikelihood_mode == 'loss':
        count = len(self.scorer.tokenizer.encode(continuation))
        answer = (-logprob / count, greedy)
      else:
        answer = (logprob, greedy)
      self.cache_hook.add_partial('loglikelihood', (context, continuation),
                                  answer)
      out.append(answer)
    return out

  # Generation.

  def _greedy_settings(self, gen_kwargs: dict | None
                       ) -> tuple[tuple[str, ...], int]:
    """(until, max_new_tokens) of one request; a ValueError for sampling
    or beam search. temperature is ignored unless do_sample (as HF)."""
    kwargs = dict(gen_kwargs or {})
    if _as_bool(kwargs.pop('do_sample', False)):
      raise ValueError('moe_jax_vlm: generate_until decodes greedily only; '
                       'got do_sample=True (set do_sample: false in the task '
                       'or --gen_kwargs)')
    num_beams = kwargs.pop('num_beams', 1)
    if num_beams is not None and int(num_beams) != 1:
      raise ValueError(f'moe_jax_vlm: generate_until decodes greedily only; '
                       f'got num_beams={num_beams}')
    until = kwargs.pop('until', None) or ()
    if isinstance(until, str):
      until = [until]
    elif not isinstance(until, (list, tuple)):
      raise ValueError(f'moe_jax_vlm: gen_kwargs until={until!r}: expected a '
                       'string or a list of strings')
    new = kwargs.pop('max_new_tokens', None)
    if new is None:
      new = kwargs.pop('max_gen_toks', None)
    new = self.max_new_tokens if new is None else _as_int(
        new, 'max_new_tokens', allow_none=False)
    for key in _SAMPLING_ONLY:
      kwargs.pop(key, None)
    if kwargs:
      logger.warning('moe_jax_vlm: gen_kwargs %s ignored', sorted(kwargs))
    return tuple(u for u in until if u), new

  def generate_until(self, requests) -> list[str]:
    """Greedy answer of each (context, gen_kwargs, doc_to_visual, doc_id,
    task, split), cut before the first `until` string or the template's
    end of turn, at most max_new_tokens tokens."""
    inputs = []
    for request in requests:
      context, gen_kwargs, doc_to_visual, doc_id, task, split = (
          request.args[:6])
      until, new = self._greedy_settings(gen_kwargs)
      inputs.append((self._image(doc_to_visual, task, split, doc_id),
                     context, new, until))
    texts = self.scorer.generate(inputs, desc='lmms generate_until')
    for request, text in zip(requests, texts, strict=True):
      self.cache_hook.add_partial('generate_until', request.args, text)
    return texts

  def generate_until_multi_round(self, requests) -> list[str]:
    raise NotImplementedError('moe_jax_vlm: multi-round generation is not '
                              'implemented')


# Known to lmms-eval's resolver (simple_evaluate(model='moe_jax_vlm'), the
# CLI) even where the entry point is not installed yet.
for _manifest in lmms_package.manifests():
  lmms_eval.models.MODEL_REGISTRY_V2.register_manifest(_manifest,
                                                       overwrite=True)
