"""Scoring a model's tokens: cross-entropy, next-token accuracy, validation.

Shared by the trainer (its loss and validation), the analyses that evaluate a
checkpoint (DropTop) and, next, zero-shot evaluation (log-likelihood of
continuations). Everything here takes the model's variables, never a train
state, so a restored checkpoint needs no optimiser to be scored.

Dimension legend: B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp


# Batch fields: the tokens, the next-token targets, an optional per-token
# loss weight (VLM: 1 on assistant tokens only) and the model's other inputs
# (VLM: the images and the padding mask), passed to it by name.
TOKEN_FIELDS = ('inputs', 'targets')
LOSS_MASK = 'loss_mask'
MODEL_INPUTS = ('images', 'attention_mask')


def batch_fields(batch: Mapping[str, Any]) -> dict[str, Any]:
  """The fields of a pipeline batch that a step consumes (others dropped)."""
  return {k: batch[k] for k in TOKEN_FIELDS + (LOSS_MASK,) + MODEL_INPUTS
          if k in batch}


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
  """The batch's model inputs beyond the tokens (images, attention mask)."""
  return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def token_cross_entropy(logits: jax.Array, targets: jax.Array,
                        weights: jax.Array | None = None
                        ) -> tuple[jax.Array, jax.Array]:
  """logits [B, S, V], targets [B, S] -> (mean CE, accuracy), float32.

  weights [B, S] (optional): the means are weighted by them (a loss mask);
  a batch whose weights are all zero gives 0, not NaN.
  """
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)                       # [B, S]
  target_logit = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  if weights is None:
    return jnp.mean(logz - target_logit), jnp.mean(correct)
  weights = weights.astype(jnp.float32)
  total = jnp.maximum(jnp.sum(weights), 1e-9)
  # Positions of weight 0 are selected out, not multiplied by 0: a target
  # there may be any id (a VLM's image placeholder lies past the vocabulary,
  # where take_along_axis gives NaN, and NaN * 0 is NaN).
  nll = jnp.where(weights > 0, logz - target_logit, 0.0)
  return (jnp.sum(nll * weights) / total, jnp.sum(correct * weights) / total)


def apply_model(model, params, router_state, inputs: jax.Array, *,
                train: bool, step, rng: jax.Array | None = None,
                **extra_inputs):
  """model.apply with the router-state collection when the model has one.

  extra_inputs: the model's other inputs by name (`model_inputs(batch)`).
  Returns the model's (logits [B, S, V], per-layer aux list).
  """
  variables = {'params': params}
  if router_state:
    variables['router_state'] = router_state
  rngs = {'router': rng} if rng is not None else None
  return model.apply(variables, inputs, train=train, step=step, rngs=rngs,
                     **extra_inputs)


def eval_step(params, router_state, step, batch: dict[str, jax.Array], *,
              model) -> dict[str, jax.Array]:
  """Mean CE and next-token accuracy of one batch {'inputs', 'targets'}
  [B, S] (weighted by its 'loss_mask' when it has one), in eval mode (no
  router noise, no state updates), and the batch's token weight: B·S, or
  the sum of its loss mask. `mean_over_batches` weights each batch by it,
  so a validation set's loss is its summed NLL over its total weight."""
  logits, _ = apply_model(model, params, router_state, batch['inputs'],
                          train=False, step=step, **model_inputs(batch))
  weights = batch.get(LOSS_MASK)
  ce, accuracy = token_cross_entropy(logits, batch['targets'], weights)
  tokens = (jnp.asarray(batch['targets'].size, jnp.float32) if weights is None
            else jnp.sum(weights.astype(jnp.float32)))
  return {'ce': ce, 'accuracy': accuracy, 'tokens': tokens}


def mean_over_batches(outputs: Iterable[dict[str, Any]]) -> dict[str, float]:
  """Validation summary from per-batch {'ce', 'accuracy'[, 'tokens']}.

  Each batch's mean CE and accuracy are weighted by its token weight
  'tokens' (1 when absent): 'loss' = Σ_b tokens_b·ce_b / Σ_b tokens_b, the
  summed NLL of the set over its total weight, so a batch with few scored
  tokens (a VLM batch mostly masked out) counts for its tokens, not as a
  whole batch. The sums are float64 on the host; batches of equal weight
  give exactly the mean of their means. Also its perplexity, the accuracy
  and the batch count.

  Raises:
    ValueError: no batches, or batches whose weights sum to 0.
  """
  totals = {'ce': 0.0, 'accuracy': 0.0}
  weight, count = 0.0, 0
  for out in outputs:
    out = jax.device_get(out)
    tokens = float(out.get('tokens', 1.0))
    for key in totals:
      # A batch of weight 0 adds nothing (its mean is 0 by convention).
      totals[key] += float(out[key]) * tokens
    weight += tokens
    count += 1
  if not count:
    raise ValueError('no validation batches to score (is the evaluation set '
                     'empty? config.train.eval_batches)')
  if weight <= 0:
    raise ValueError(f'the {count} validation batches score no token (their '
                     'loss_mask is 0 everywhere): check the validation data '
                     '(config.data.eval_path)')
  ce = totals['ce'] / weight
  # exp of a diverged loss would overflow; cap it for the log.
  return {'loss': ce, 'ppl': math.exp(min(ce, 50.0)),
          'accuracy': totals['accuracy'] / weight, 'batches': count}


def evaluate(score_batch: Callable[[dict], dict],
             batches: Iterable[dict]) -> dict[str, float]:
  """Validation loss (token-weighted mean CE), perplexity and accuracy over
  `batches`.

  Args:
    score_batch: batch -> {'ce', 'accuracy', 'tokens'} (a jitted eval_step
      with the variables bound); without 'tokens' every batch weighs 1.
    batches: {'inputs', 'targets'} batches, ready for score_batch.
  """
  return mean_over_batches(score_batch(batch) for batch in batches)
