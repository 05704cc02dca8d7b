"""The optimizers against their definitions: Lion's first step is -lr * sign(gradient); Adafactor
keeps factored (row and column) second moments for matrices; each trains a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import gpt_causal
from transformer import optim


def config(**overrides):
  c = gpt_causal.get_config('tiny')
  c.update(dict(schedule='constant', warmup_steps=1, grad_clip_norm=0.0, weight_decay=0.0),
           **overrides)
  return c


def test_lion_first_step_is_minus_lr_times_sign_of_the_gradient():
  c = config(optimizer='lion', learning_rate=0.01)
  tx = optim.make_optimizer(c)
  params = {'w': jnp.array([[0.5, -1.0], [2.0, 0.0]])}
  grads = {'w': jnp.array([[0.3, -0.2], [1e-3, -4.0]])}
  state = tx.init(params)
  state = tx.update(grads, state, params)[1]  # step 0: the warmup's rate is 0
  updates, _ = tx.update(grads, state, params)
  # From momentum m = (1 - b2) g after the first step: c = b1 m + (1 - b1) g has g's sign.
  np.testing.assert_allclose(updates['w'], -0.01 * np.sign(grads['w']), rtol=1e-6)


def test_adafactor_factors_the_second_moment_of_matrices():
  c = config(optimizer='adafactor', learning_rate=0.01)
  params = {'w': jnp.ones((256, 384)), 'b': jnp.ones((384,))}
  state = optim.make_optimizer(c).init(params)
  sizes = {jax.tree_util.keystr(path): leaf.shape
           for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}
  second_moments_of_w = {k: v for k, v in sizes.items() if "['w']" in k}
  # Row means (256) and column means (384) of w; its full second moment is not kept.
  assert sorted(second_moments_of_w.values()) == [(1,), (256,), (384,)], sizes


@pytest.mark.parametrize('name, rate', [('adafactor', 1e-2), ('lion', 3e-3)])
def test_each_optimizer_trains(name, rate):
  from tests.test_train import run_steps, synthetic_batch  # pylint: disable=import-outside-toplevel
  c = config(optimizer=name, learning_rate=rate, label_smoothing=0.0)
  _, losses = run_steps(c, synthetic_batch('gpt_causal'), 60, devices=jax.devices()[:1])
  assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
