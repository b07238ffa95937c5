"""Masked cross-entropy: the loss of a VLM batch, whose masked targets may be
ids past the vocabulary (the image placeholder)."""

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import scoring


def test_masked_targets_outside_the_vocabulary_give_a_finite_loss():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 5))
  # Id 5 (= V) sits at positions of weight 0, as an image placeholder does.
  targets = jnp.array([[1, 5, 2], [5, 0, 4]])
  weights = jnp.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
  loss, accuracy = scoring.token_cross_entropy(logits, targets, weights)
  # By hand: mean of -log softmax at the four weighted positions.
  log_p = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  kept = [(0, 0, 1), (0, 2, 2), (1, 1, 0), (1, 2, 4)]
  want = -np.mean([log_p[b, s, t] for b, s, t in kept])
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  assert np.isfinite(accuracy)
  grad = jax.grad(lambda z: scoring.token_cross_entropy(z, targets,
                                                        weights)[0])(logits)
  assert np.all(np.isfinite(grad))
  # Masked positions get no gradient.
  assert not np.any(grad[0, 1]) and not np.any(grad[1, 0])
