"""Learning-rate schedules and the optax optimizer.

A separate module so the schedule can be plotted and tested on its own.
"""

import jax
import jax.numpy as jnp
import optax


def rsqrt_schedule(d_model: int, warmup_steps: int, multiplier: float = 1.0):
  """The paper's rate: multiplier * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5).

  `step` counts optimizer updates from 1 (optax passes the 0-based count, hence the + 1).
  """
  def schedule(count):
    step = jnp.asarray(count, jnp.float32) + 1.0
    return multiplier * d_model ** -0.5 * jnp.minimum(step ** -0.5, step * warmup_steps ** -1.5)
  return schedule


def make_schedule(config):
  """step (0-based update count) -> learning rate, from config.schedule."""
  if config.schedule == 'rsqrt':
    return rsqrt_schedule(config.d_model, config.warmup_steps, config.learning_rate)
  if config.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
        decay_steps=max(config.num_train_steps, config.warmup_steps + 1),
        end_value=config.learning_rate * 0.1)
  if config.schedule == 'constant':
    return optax.linear_schedule(0.0, config.learning_rate, max(config.warmup_steps, 1))
  raise ValueError(f'config.schedule must be rsqrt, cosine or constant, got {config.schedule!r}')


def make_optimizer(config) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW (b1, b2, eps, decoupled weight decay) on the schedule."""
  if config.optimizer != 'adamw':
    raise ValueError(f'config.optimizer must be adamw, got {config.optimizer!r}')
  clip = (optax.clip_by_global_norm(config.grad_clip_norm) if config.grad_clip_norm > 0
          else optax.identity())
  # Decay matrices only: biases and LayerNorm parameters are left alone, as is customary.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(clip, optax.adamw(make_schedule(config), b1=config.b1, b2=config.b2,
                                       eps=config.eps, weight_decay=config.weight_decay,
                                       mask=decay_mask))
