"""Learning-rate schedules and the optax optimizer.

A separate module so the schedule can be plotted and tested on its own.
"""

import jax
import jax.numpy as jnp
import optax

from transformer import errors

SCHEDULES = ('rsqrt', 'cosine', 'constant')
OPTIMIZERS = ('adamw', 'adafactor', 'lion')


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
  raise errors.ConfigError(f'config.schedule must be one of {", ".join(SCHEDULES)}, got '
                           f'{config.schedule!r}')


def make_optimizer(config) -> optax.GradientTransformation:
  """Global-norm clipping, then the config's optimizer on the schedule:

    adamw      Adam (b1, b2, eps) with decoupled weight decay (the paper's Adam at decay 0)
    adafactor  T5's: factored second moments (row and column means for matrices), updates
               clipped at RMS 1 and scaled by each parameter's RMS; no first moment
    lion       the sign of an interpolated momentum (b1, b2), decoupled weight decay; it wants
               a learning rate about 3-10x smaller than Adam's

  The rate is injected (optax.inject_hyperparams): the optimizer state holds the rate of its
  latest update, which `learning_rate` reads for the logs.
  """
  if config.optimizer not in OPTIMIZERS:
    raise errors.ConfigError(f'config.optimizer must be one of {", ".join(OPTIMIZERS)}, got '
                             f'{config.optimizer!r}')
  clip = (optax.clip_by_global_norm(config.grad_clip_norm) if config.grad_clip_norm > 0
          else optax.identity())
  # Decay matrices only: biases and LayerNorm parameters are left alone, as is customary.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)

  def optimizer(learning_rate):
    if config.optimizer == 'adafactor':
      update = optax.adafactor(learning_rate, weight_decay_rate=config.weight_decay or None,
                               weight_decay_mask=decay_mask)
    elif config.optimizer == 'lion':
      update = optax.lion(learning_rate, b1=config.b1, b2=config.b2,
                          weight_decay=config.weight_decay, mask=decay_mask)
    else:
      update = optax.adamw(learning_rate, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay, mask=decay_mask)
    return optax.chain(clip, update)

  return optax.inject_hyperparams(optimizer)(learning_rate=make_schedule(config))


def learning_rate(opt_state) -> jax.Array:
  """The rate of the latest update that `opt_state` (of make_optimizer) took."""
  return opt_state.hyperparams['learning_rate']
