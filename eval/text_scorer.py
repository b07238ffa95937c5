"""Text in, log-likelihoods out: a checkpoint, its tokenizer and the scorer.

`TextScorer` is what the zero-shot tasks (eval/tasks/) and the lm-eval
adapter call. It encodes text LibMoE's way (algorithms.md §7 rule 1: the
context and the continuation are encoded separately and concatenated),
puts a document-start prefix in front of every sequence, and hands the ids
to moe_jax.loglikelihood.Scorer (batched, bucketed, data parallel).

The document-start prefix is what precedes a document in training, so that
the first word of a sentence (BLiMP scores whole sentences with no context)
is predicted like the first word of a training document:
  * SentencePiece runs (LibMoE's LM stack): the ids of the document
    separator text ('<STORY_SEP>', config.data.doc_separator) as they are
    encoded after a document's last word;
  * Hugging Face tokenizers: the bos token, else eos (lm-eval's
    prefix_token_id rule).
The prefix is never scored.

Built three ways: `from_workdir` (a trained run's checkpoint and
tokenizer), `from_hf` (an HF model directory, imported to JAX, with its
tokenizer) and the constructor (a Scorer and a tokenizer already at hand).
"""

from __future__ import annotations

from typing import Sequence

import ml_collections

from moe_jax import loglikelihood
from moe_jax import restore
from moe_jax import run_log
from moe_jax.convert import hf_import
from moe_jax.data import from_config
from moe_jax.data import tokenizer as tokenizer_lib

Score = loglikelihood.Score


def separator_ids(tokenizer, separator: str) -> list[int]:
  """The ids `separator` gets when it ends a document in training.

  The pipeline encodes `text + separator`, so the separator is glued to the
  document's last word; encoding it alone would add SentencePiece's word
  boundary in front. For a few common last words w, the difference of
  encode(w + sep) and encode(w) is the glued form when the latter is a
  prefix of the former; the first such w decides.
  """
  for word in ('.', 'the', 'a', '"'):
    anchor = tokenizer.encode(word)
    glued = tokenizer.encode(word + separator)
    if glued[:len(anchor)] == anchor and len(glued) > len(anchor):
      return glued[len(anchor):]
  return tokenizer.encode(separator)


def document_prefix(tokenizer, *, separator: str = '') -> list[int]:
  """The ids put before every scored sequence (see the module docstring)."""
  if separator:
    return separator_ids(tokenizer, separator)
  for token in (tokenizer.bos_id, tokenizer.eos_id):
    if token is not None:
      return [token]
  raise ValueError(f'{tokenizer}: the tokenizer has no bos or eos token and '
                   'no document separator was given; a scored sequence '
                   'needs a document-start prefix')


def run_prefix(config: ml_collections.ConfigDict, tokenizer) -> list[int]:
  """The document-start prefix of a run's tokenizer (module docstring)."""
  separator = ('' if config.data.tokenizer_type == 'hf' else
               config.data.doc_separator)
  return document_prefix(tokenizer, separator=separator)


class TextScorer:
  """Log-likelihoods and greedy continuations of strings.

  Attributes:
    scorer: the token-level moe_jax.loglikelihood.Scorer.
    tokenizer: SentencePieceTokenizer or HFTokenizer.
    prefix: the document-start ids put before every sequence.
    step: the checkpoint step scored (0 for an imported HF model).
  """

  def __init__(self, scorer: loglikelihood.Scorer, tokenizer,
               prefix: Sequence[int], *, step: int = 0):
    if not prefix:
      raise ValueError('prefix: expected at least one document-start id')
    self.scorer = scorer
    self.tokenizer = tokenizer
    self.prefix = tuple(int(t) for t in prefix)
    self.step = step

  @classmethod
  def from_workdir(cls, workdir: str, *,
                   config: ml_collections.ConfigDict | None = None,
                   step: int | None = None, batch_size: int = 32,
                   max_len: int | None = None, model=None,
                   progress: bool = True) -> 'TextScorer':
    """A trained run's checkpoint (default: the newest) and tokenizer.

    Args:
      workdir: the run directory.
      config: the run's config (default: its config.json).
      step: the checkpoint to score.
      batch_size: rows per scoring batch.
      max_len: the context length (default: config.data.seq_len).
      model: a model to use instead of models.build(config), e.g. one
        built from a modified config with the same parameters (DropTop).
      progress: show progress bars.
    """
    config = (config if config is not None else
              run_log.load_saved_config(workdir))
    run = restore.restore_run(config, workdir, step, what='evaluate')
    return cls.from_run(run, config, workdir, batch_size=batch_size,
                        max_len=max_len, model=model, progress=progress)

  @classmethod
  def from_run(cls, run: restore.RestoredRun,
               config: ml_collections.ConfigDict, workdir: str, *,
               batch_size: int = 32, max_len: int | None = None, model=None,
               progress: bool = True) -> 'TextScorer':
    """A restored run's variables with the run's tokenizer (see
    from_workdir for the arguments)."""
    tokenizer = from_config.load_run_tokenizer(config, workdir)
    scorer = loglikelihood.Scorer(
        model if model is not None else run.model, run.params,
        run.router_state, step=run.step,
        max_len=max_len or config.data.seq_len, batch_size=batch_size,
        progress=progress)
    return cls(scorer, tokenizer, run_prefix(config, tokenizer),
               step=run.step)

  @classmethod
  def from_hf(cls, hf_dir: str, *, batch_size: int = 32, max_len: int = 2048,
              progress: bool = True) -> 'TextScorer':
    """A Hugging Face model directory, imported to JAX, with its tokenizer.

    max_len is capped by the model's max_position_embeddings.
    """
    model, params, router_state, _ = hf_import.import_hf_with_state(
        hf_dir, progress=progress)
    hf = hf_import.read_hf_config(hf_dir)
    max_len = min(max_len, hf.get('max_position_embeddings') or max_len)
    tokenizer = tokenizer_lib.load_hf_tokenizer(hf_dir)
    scorer = loglikelihood.Scorer(model, params, router_state,
                                  max_len=max_len, batch_size=batch_size,
                                  progress=progress)
    return cls(scorer, tokenizer, document_prefix(tokenizer))

  @property
  def max_len(self) -> int:
    return self.scorer.max_len

  @property
  def eot_token_id(self) -> int:
    """End of text: the tokenizer's eos, else the last prefix id."""
    eos = self.tokenizer.eos_id
    return eos if eos is not None else self.prefix[-1]

  def encode(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text)) if text else []

  def decode(self, tokens: Sequence[int]) -> str:
    return self.tokenizer.decode(list(tokens))

  def requests(self, pairs: Sequence[tuple[str, str]]
               ) -> list[loglikelihood.Request]:
    """(context, continuation) -> Requests, each piece encoded on its own."""
    texts = sorted({t for pair in pairs for t in pair})
    ids = dict(zip(texts, (self.encode(t) for t in texts)))
    out = []
    for context, continuation in pairs:
      if not ids[continuation]:
        raise ValueError(f'continuation {continuation!r} (after context '
                         f'{context[-60:]!r}) encodes to no tokens')
      out.append(loglikelihood.Request(self.prefix + tuple(ids[context]),
                                       tuple(ids[continuation])))
    return out

  def loglikelihood(self, pairs: Sequence[tuple[str, str]], *,
                    desc: str = 'scoring') -> list[Score]:
    """One Score per (context, continuation); an empty context is allowed."""
    return self.scorer.loglikelihood(self.requests(pairs), desc=desc)

  def rolling_loglikelihood(self, texts: Sequence[str], *,
                            desc: str = 'rolling') -> list[float]:
    """Total log-likelihood of each text, every token predicted once.

    A text longer than max_len is cut into windows of max_len tokens; each
    window is scored with as much of the text before it as fits.
    """
    requests, owner = [], []
    for index, text in enumerate(texts):
      ids = self.encode(text)
      for start in range(0, len(ids), self.max_len):
        requests.append(loglikelihood.Request(
            self.prefix + tuple(ids[:start]),
            tuple(ids[start:start + self.max_len])))
        owner.append(index)
    totals = [0.0] * len(texts)
    for index, score in zip(owner, self.scorer.loglikelihood(requests,
                                                             desc=desc)):
      totals[index] += score.logprob
    return totals

  def generate(self, contexts: Sequence[str], *, max_new_tokens: int,
               until: Sequence[str] = (), desc: str = 'generating'
               ) -> list[str]:
    """Greedy continuation text of each context, cut at the first `until`
    string; generation of a row stops there or at end of text."""
    until = [u for u in until if u]

    def stop(generated: list[int]) -> bool:
      if generated[-1] == self.eot_token_id:
        return True
      text = self.decode(generated)
      return any(u in text for u in until)

    prompts = [self.prefix + tuple(self.encode(c)) for c in contexts]
    out = []
    for ids in self.scorer.generate(prompts, max_new_tokens=max_new_tokens,
                                    stop=stop, desc=desc):
      if ids and ids[-1] == self.eot_token_id:
        ids = ids[:-1]
      text = self.decode(ids)
      cuts = [text.index(u) for u in until if u in text]
      out.append(text[:min(cuts)] if cuts else text)
    return out
