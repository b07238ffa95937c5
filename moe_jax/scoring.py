"""Scoring a model's tokens: cross-entropy, next-token accuracy, validation.

Shared by the trainer (its loss and validation), the analyses that evaluate a
checkpoint (DropTop) and, next, zero-shot evaluation (log-likelihood of
continuations). Everything here takes the model's variables, never a train
state, so a restored checkpoint needs no optimiser to be scored.

Dimension legend: B batch, S sequence, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp


def token_cross_entropy(logits: jax.Array, targets: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
  """logits [B, S, V], targets [B, S] -> (mean CE, accuracy), float32."""
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)                       # [B, S]
  target_logit = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  correct = jnp.argmax(logits, axis=-1) == targets
  return jnp.mean(logz - target_logit), jnp.mean(correct.astype(jnp.float32))


def apply_model(model, params, router_state, inputs: jax.Array, *,
                train: bool, step, rng: jax.Array | None = None):
  """model.apply with the router-state collection when the model has one.

  Returns the model's (logits [B, S, V], per-layer aux list).
  """
  variables = {'params': params}
  if router_state:
    variables['router_state'] = router_state
  rngs = {'router': rng} if rng is not None else None
  return model.apply(variables, inputs, train=train, step=step, rngs=rngs)


def eval_step(params, router_state, step, batch: dict[str, jax.Array], *,
              model) -> dict[str, jax.Array]:
  """Mean CE and next-token accuracy of one batch {'inputs', 'targets'}
  [B, S], in eval mode (no router noise, no state updates)."""
  logits, _ = apply_model(model, params, router_state, batch['inputs'],
                          train=False, step=step)
  ce, accuracy = token_cross_entropy(logits, batch['targets'])
  return {'ce': ce, 'accuracy': accuracy}


def mean_over_batches(outputs: Iterable[dict[str, Any]]) -> dict[str, float]:
  """Validation summary from per-batch {'ce', 'accuracy'}: the mean CE as
  'loss', its perplexity, the mean accuracy and the batch count."""
  totals = {'ce': 0.0, 'accuracy': 0.0}
  count = 0
  for out in outputs:
    out = jax.device_get(out)
    for key in totals:
      totals[key] += float(out[key])
    count += 1
  if not count:
    raise ValueError('no validation batches to score (is the evaluation set '
                     'empty? config.train.eval_batches)')
  ce = totals['ce'] / count
  # exp of a diverged loss would overflow; cap it for the log.
  return {'loss': ce, 'ppl': math.exp(min(ce, 50.0)),
          'accuracy': totals['accuracy'] / count, 'batches': count}


def evaluate(score_batch: Callable[[dict], dict],
             batches: Iterable[dict]) -> dict[str, float]:
  """Validation loss (mean CE), perplexity and accuracy over `batches`.

  Args:
    score_batch: batch -> {'ce', 'accuracy'} (a jitted eval_step with the
      variables bound).
    batches: {'inputs', 'targets'} batches, ready for score_batch.
  """
  return mean_over_batches(score_batch(batch) for batch in batches)
