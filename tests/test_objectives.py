"""The loss: label-smoothed cross-entropy against its definition, its hand-written gradient
against automatic differentiation, accuracy against argmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer import objectives


def reference_losses(logits_BxLxV, targets_BxL, label_smoothing):
  """KL(q || p) and NLL straight from the definitions, differentiated automatically."""
  vocab_size = logits_BxLxV.shape[-1]
  log_p = jax.nn.log_softmax(logits_BxLxV, axis=-1)
  one_hot = jax.nn.one_hot(targets_BxL, vocab_size)
  q = one_hot * (1.0 - label_smoothing) + (1.0 - one_hot) * label_smoothing / (vocab_size - 1)
  kl = (q * (jnp.log(jnp.where(q > 0, q, 1.0)) - log_p)).sum(-1)
  return kl, -(log_p * one_hot).sum(-1)


def random_problem(seed=0, shape=(3, 5, 11)):
  k1, k2 = jax.random.split(jax.random.key(seed))
  logits = 3.0 * jax.random.normal(k1, shape)
  targets = jax.random.randint(k2, shape[:2], 0, shape[2])
  return logits, targets


@pytest.mark.parametrize('label_smoothing', [0.0, 0.1])
def test_loss_and_nll_match_their_definitions(label_smoothing):
  logits, targets = random_problem()
  loss, nll, _ = objectives.smoothed_cross_entropy(logits, targets, label_smoothing)
  want_loss, want_nll = reference_losses(logits, targets, label_smoothing)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(nll, want_nll, rtol=1e-5, atol=1e-5)


def test_a_perfect_prediction_of_the_smoothed_target_scores_zero():
  vocab, eps, target = 7, 0.1, 3
  q = np.full(vocab, eps / (vocab - 1))
  q[target] = 1 - eps
  logits = jnp.log(jnp.asarray(q))[None, None, :]
  loss, _, _ = objectives.smoothed_cross_entropy(logits, jnp.full((1, 1), target), eps)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)


@pytest.mark.parametrize('label_smoothing', [0.0, 0.1])
def test_hand_written_gradient_matches_autodiff(label_smoothing):
  logits, targets = random_problem(1)
  weights = jax.random.uniform(jax.random.key(2), targets.shape)
  # Both outputs carry a gradient, with different weights, to test each cotangent's path.
  def combine(losses):
    loss, nll = losses[0], losses[1]
    return (weights * loss).sum() + 0.3 * (weights * nll).sum()

  got = jax.grad(lambda x: combine(objectives.smoothed_cross_entropy(x, targets,
                                                                     label_smoothing)))(logits)
  want = jax.grad(lambda x: combine(reference_losses(x, targets, label_smoothing)))(logits)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_accuracy_counts_tokens_whose_target_has_the_top_logit():
  logits, targets = random_problem(3, (4, 50, 9))
  _, _, correct = objectives.smoothed_cross_entropy(logits, targets, 0.1)
  np.testing.assert_array_equal(correct, logits.argmax(-1) == targets)
  assert 0 < int(correct.sum()) < correct.size  # both outcomes occur
