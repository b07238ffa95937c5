"""lm-evaluation-harness (0.4.13) model 'moe_jax': a moe_jax checkpoint behind
lm-eval's TemplateLM.

Importing this module registers the model (`@register_model('moe_jax')`), so
any lm-eval task, including the offline ones in eval/lm_eval_tasks/, can
score a moe_jax workdir, and lm-eval's numbers can be set beside the native
LibMoE-rule evaluator's (eval/tasks/, eval/lm_eval_compare.py).

Python (a TextScorer at hand, or a workdir):

  import lm_eval
  from lm_eval.tasks import TaskManager
  from eval import lm_eval_adapter
  lm = lm_eval_adapter.MoEJaxLM.from_text_scorer(text_scorer)
  # or: lm_eval_adapter.MoEJaxLM(workdir=W, step=200, batch_size=32)
  results = lm_eval.simple_evaluate(
      model=lm, tasks=['piqa_local', 'arc_local'], limit=100,
      task_manager=TaskManager(include_path='eval/lm_eval_tasks'))

Command line (lm-eval 0.4.13 has no --include_package; eval/lm_eval_cli.py
imports this module, then runs lm-eval's own CLI):

  python -m eval.lm_eval_cli --model moe_jax \
      --model_args workdir=W,step=200,max_len=512 --batch_size 32 \
      --include_path eval/lm_eval_tasks --tasks piqa_local,arc_local \
      --limit 100 --output_path out/ --log_samples

model_args: workdir (required), step (default: the newest checkpoint),
batch_size (rows per scoring batch; wins over --batch_size), max_len
(default: the run's config.data.seq_len).

Tokenisation is LibMoE's, the native evaluator's (eval/text_scorer.py), not
lm-eval's default:
  * the context and the continuation are encoded SEPARATELY and
    concatenated (lm-eval encodes context + continuation together and
    splits); trailing whitespace of the context is first moved into the
    continuation, as lm-eval does;
  * the TextScorer's document-start prefix (the ids of '<STORY_SEP>' as
    they end a training document, or bos/eos for HF tokenizers) is put in
    front of EVERY context, the empty one included (lm-eval puts
    prefix_token_id only before an empty context).
So lm-eval and the native evaluator score identical token sequences, and
their log-likelihoods agree to float rounding (tests/eval_lm).

Scoring goes through moe_jax.loglikelihood.Scorer: all of a call's requests
in one scorer call (it dedupes, sorts and batches them into a few compiled
shapes); requests longer than max_len are left-truncated there.
generate_until is greedy only.

lm-eval sees one process (rank 0 of 1): on several hosts run it on every
process (the scorer shards each batch over all devices of all processes)
and let process 0 write the results.
"""

from __future__ import annotations

import collections
import logging
from typing import Any, Sequence

# Imported before registering: lm-eval fills its registry with the built-in
# model names only when the registry is empty.
import lm_eval.models  # noqa: F401  pylint: disable=unused-import
from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from eval import text_scorer as text_scorer_lib
from moe_jax import loglikelihood

logger = logging.getLogger(__name__)

MODEL_NAME = 'moe_jax'
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_GEN_TOKS = 256
# gen_kwargs that only shape sampling; ignored under greedy decoding.
_SAMPLING_ONLY = ('top_p', 'top_k', 'min_p', 'typical_p', 'seed')


def _as_int(value: Any, field: str, *, allow_none: bool = True
            ) -> int | None:
  """An int from a model_args value (lm-eval passes str, int or None)."""
  if value is None or (isinstance(value, str) and value.strip().lower() in (
      '', 'none')):
    if allow_none:
      return None
    raise ValueError(f'model_args {field}: a value is required')
  if isinstance(value, bool):
    raise ValueError(f'model_args {field}={value!r}: expected an integer')
  try:
    number = int(str(value).strip()) if isinstance(value, str) else int(value)
  except ValueError:
    raise ValueError(f'model_args {field}={value!r}: expected an '
                     'integer') from None
  if number != value and not isinstance(value, str):
    raise ValueError(f'model_args {field}={value!r}: expected an integer')
  return number


def _batch_size(value: Any) -> int | None:
  """Rows per batch from model_args / the harness's batch_size: an int,
  None or 'auto[:N]' (-> None: the default; the scorer's buckets are fixed,
  there is nothing to tune)."""
  if isinstance(value, str) and value.strip().lower().startswith('auto'):
    return None
  number = _as_int(value, 'batch_size')
  if number is not None and number < 1:
    raise ValueError(f'batch_size={value!r}: expected a positive integer')
  return number


@register_model(MODEL_NAME)
class MoEJaxLM(TemplateLM):
  """A moe_jax checkpoint (through a TextScorer) as an lm-eval model.

  Attributes:
    text_scorer: the eval.text_scorer.TextScorer that encodes and scores.
  """

  def __init__(self, workdir: str | None = None, step: Any = None,
               batch_size: Any = None, max_len: Any = None, *,
               text_scorer: text_scorer_lib.TextScorer | None = None,
               max_gen_toks: Any = DEFAULT_MAX_GEN_TOKS,
               progress: Any = True, max_batch_size: Any = None,
               device: Any = None):
    """Built from lm-eval's model_args, or around a TextScorer.

    Args:
      workdir: the moe_jax run directory (model_args workdir=...).
      step: the checkpoint step (default: the newest).
      batch_size: rows per scoring batch (default 32).
      max_len: the context length (default: config.data.seq_len).
      text_scorer: an existing TextScorer instead of a workdir (see
        from_text_scorer); then step, batch_size and max_len must be unset.
      max_gen_toks: generate_until's default max_gen_toks.
      progress: show the scorer's progress bars (workdir only).
      max_batch_size, device: passed by lm-eval's harness; unused (the
        batch size is fixed, JAX places the model on its devices).
    """
    super().__init__()
    del max_batch_size
    if device is not None:
      logger.info('moe_jax: device=%r ignored; JAX uses its default '
                  'devices (set JAX_PLATFORMS to choose)', device)
    if (workdir is None) == (text_scorer is None):
      raise ValueError('moe_jax model: give exactly one of model_args '
                       'workdir=<moe_jax run directory> or text_scorer=<a '
                       'TextScorer>')
    if text_scorer is None:
      batch = _batch_size(batch_size)
      text_scorer = text_scorer_lib.TextScorer.from_workdir(
          str(workdir), step=_as_int(step, 'step'),
          batch_size=DEFAULT_BATCH_SIZE if batch is None else batch,
          max_len=_as_int(max_len, 'max_len'),
          progress=str(progress).lower() not in ('false', '0'))
    elif any(v is not None for v in (step, max_len)) or (
        _batch_size(batch_size) not in (None, text_scorer.scorer.batch_size)):
      raise ValueError('moe_jax model: step, batch_size and max_len come '
                       'from the given text_scorer; leave them unset')
    self.text_scorer = text_scorer
    self._max_gen_toks = _as_int(max_gen_toks, 'max_gen_toks',
                                 allow_none=False)
    self._warned_gen_clamp = False

  @classmethod
  def from_text_scorer(cls, text_scorer: text_scorer_lib.TextScorer, *,
                       max_gen_toks: int = DEFAULT_MAX_GEN_TOKS
                       ) -> 'MoEJaxLM':
    """The model around an existing TextScorer (tests, notebooks)."""
    return cls(text_scorer=text_scorer, max_gen_toks=max_gen_toks)

  @classmethod
  def _merged(cls, args: dict[str, Any], additional: dict[str, Any] | None
              ) -> 'MoEJaxLM':
    """model_args win over the harness's settings (the CLI always passes
    batch_size, default 1; lm-eval's own merge would fail on the repeat)."""
    extra = {k: v for k, v in (additional or {}).items()
             if v is not None and k not in args}
    return cls(**args, **extra)

  @classmethod
  def create_from_arg_string(cls, arg_string: str,
                             additional_config: dict | None = None
                             ) -> 'MoEJaxLM':
    return cls._merged(lm_eval_utils.simple_parse_args_string(arg_string),
                       additional_config)

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict[str, Any],
                          additional_config: dict | None = None
                          ) -> 'MoEJaxLM':
    return cls._merged(dict(arg_dict), additional_config)

  # What lm-eval reads of a model.

  @property
  def eot_token_id(self) -> int:
    return self.text_scorer.eot_token_id

  @property
  def prefix_token_id(self) -> int:
    """The last id of the document-start prefix (the token right before a
    document's first token). The adapter puts the whole prefix in front of
    every context; lm-eval itself reads this only in code paths the
    adapter overrides."""
    return self.text_scorer.prefix[-1]

  @property
  def max_length(self) -> int:
    return self.text_scorer.max_len

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def batch_size(self) -> int:
    return self.text_scorer.scorer.batch_size

  @property
  def tokenizer_name(self) -> str:
    """Part of lm-eval's request-cache key."""
    return f'{MODEL_NAME}:{self.text_scorer.tokenizer}'

  def get_model_info(self) -> dict[str, Any]:
    """Merged into lm-eval's results['config']."""
    return {'moe_jax_step': self.text_scorer.step,
            'moe_jax_max_len': self.max_length,
            'moe_jax_prefix': list(self.text_scorer.prefix),
            'moe_jax_tokenizer': str(self.text_scorer.tokenizer)}

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 **kwargs) -> list[int]:
    """The tokenizer's ids of `string`; no special tokens are ever added
    (the document-start prefix is added by _encode_pair)."""
    del add_special_tokens, kwargs
    return self.text_scorer.encode(string)

  def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
    del kwargs
    return self.text_scorer.decode(tokens)

  # Log-likelihoods.

  def _encode_pair(self, context: str, continuation: str
                   ) -> tuple[list[int], list[int]]:
    """(prefix + ids of the context, ids of the continuation), each piece
    encoded on its own (LibMoE's rule; TextScorer.requests).

    The context's trailing whitespace is moved into the continuation first,
    as lm-eval does. An empty context gives the prefix alone.
    """
    stripped = context.rstrip()
    if len(stripped) < len(context):
      continuation = context[len(stripped):] + continuation
      context = stripped
    context_enc = list(self.text_scorer.prefix) + self.tok_encode(context)
    continuation_enc = self.tok_encode(continuation)
    if not continuation_enc:
      raise ValueError(f'moe_jax: continuation {continuation!r} (after '
                       f'context {context[-60:]!r}) encodes to no tokens')
    return context_enc, continuation_enc

  def loglikelihood(self, requests, disable_tqdm: bool = False
                    ) -> list[tuple[float, bool]]:
    """(logprob, is_greedy) of each request's (context, continuation).

    Unlike TemplateLM.loglikelihood, an empty context goes through
    _encode_pair too (the full document-start prefix, not prefix_token_id).
    """
    cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    tokenized = []
    for request in requests:
      context, continuation = request.args[:2]
      key = (context, continuation)
      if key not in cache:
        cache[key] = self._encode_pair(context, continuation)
      tokenized.append((key, *cache[key]))
    return self._loglikelihood_tokens(tokenized, disable_tqdm=disable_tqdm)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                            **kwargs) -> list[tuple[float, bool]]:
    """[(key, context ids, continuation ids)] -> [(logprob, is_greedy)],
    every request in one scorer call."""
    del disable_tqdm, kwargs
    scores = self.text_scorer.scorer.loglikelihood(
        [loglikelihood.Request(tuple(context), tuple(continuation))
         for _, context, continuation in requests],
        desc='lm-eval loglikelihood')
    out = []
    for (key, _, _), score in zip(requests, scores, strict=True):
      answer = (float(score.logprob), bool(score.is_greedy))
      if key is not None:
        self.cache_hook.add_partial('loglikelihood', key, answer)
      out.append(answer)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False
                            ) -> list[float]:
    """Total log-likelihood of each request's text (args = (text,)).

    TextScorer.rolling_loglikelihood: the prefix, then windows of max_len
    tokens, each scored once with as much earlier text as fits (lm-eval's
    disjoint rolling windows); documents are never concatenated.
    """
    del disable_tqdm
    texts = [request.args[0] for request in requests]
    totals = self.text_scorer.rolling_loglikelihood(
        texts, desc='lm-eval loglikelihood_rolling')
    for text, total in zip(texts, totals, strict=True):
      self.cache_hook.add_partial('loglikelihood_rolling', (text,), total)
    return [float(t) for t in totals]

  # Generation.

  def _greedy_settings(self, gen_kwargs: dict[str, Any]
                       ) -> tuple[tuple[str, ...], int]:
    """(until, max_gen_toks) of one request's gen_kwargs; a ValueError for
    anything but greedy decoding."""
    kwargs = dict(gen_kwargs or {})
    if kwargs.pop('do_sample', False):
      raise ValueError('moe_jax: generate_until decodes greedily only; got '
                       'do_sample=True (set do_sample=False, temperature=0 '
                       'in the task or --gen_kwargs)')
    temperature = kwargs.pop('temperature', 0.0)
    if temperature is not None and float(temperature) > 0.0:
      raise ValueError(f'moe_jax: generate_until decodes greedily only; got '
                       f'temperature={temperature} (use temperature=0)')
    num_beams = kwargs.pop('num_beams', 1)
    if num_beams is not None and int(num_beams) != 1:
      raise ValueError(f'moe_jax: generate_until decodes greedily only; got '
                       f'num_beams={num_beams}')
    until = kwargs.pop('until', None)
    if until is None:
      until = [self.tok_decode([self.eot_token_id])]
    elif isinstance(until, str):
      until = [until]
    elif not isinstance(until, (list, tuple)):
      raise ValueError(f'moe_jax: gen_kwargs until={until!r}: expected a '
                       'string or a list of strings')
    max_gen_toks = _as_int(kwargs.pop('max_gen_toks', self.max_gen_toks),
                           'max_gen_toks', allow_none=False)
    for key in _SAMPLING_ONLY:
      kwargs.pop(key, None)
    if kwargs:
      logger.warning('moe_jax: gen_kwargs %s ignored', sorted(kwargs))
    limit = self.max_length - 1
    if max_gen_toks > limit:
      if not self._warned_gen_clamp:
        logger.warning('moe_jax: max_gen_toks=%d cut to %d (max_len - 1)',
                       max_gen_toks, limit)
        self._warned_gen_clamp = True
      max_gen_toks = limit
    if max_gen_toks < 1:
      raise ValueError(f'moe_jax: max_gen_toks={max_gen_toks}: expected at '
                       'least 1')
    return tuple(u for u in until if u), max_gen_toks

  def generate_until(self, requests, disable_tqdm: bool = False
                     ) -> list[str]:
    """Greedy continuation of each (context, gen_kwargs), cut before the
    first `until` string and at most max_gen_toks tokens long.

    Requests with the same (until, max_gen_toks) go to the scorer together.
    """
    del disable_tqdm
    settings = [self._greedy_settings(request.args[1])
                for request in requests]
    groups: dict[tuple, list[int]] = collections.defaultdict(list)
    for i, setting in enumerate(settings):
      groups[setting].append(i)
    out: list[str] = [''] * len(requests)
    for (until, max_gen_toks), indices in groups.items():
      texts = self.text_scorer.generate(
          [requests[i].args[0] for i in indices],
          max_new_tokens=max_gen_toks, until=until,
          desc='lm-eval generate_until')
      for i, text in zip(indices, texts, strict=True):
        out[i] = text
        self.cache_hook.add_partial('generate_until', requests[i].args, text)
    return out
