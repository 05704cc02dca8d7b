"""Objectives: how a batch feeds the model, and the loss on its logits.

The data pipelines give every variant the same loss interface: `targets` [B, L] and `weights`
[B, L] mark which positions count (non-padding target tokens for translation and LM, the selected
positions for MLM, the target part for the prefix LM), so one weighted cross-entropy serves all.
Metrics are returned as sums with their denominator so that they add up exactly across devices,
micro-batches and eval batches.
"""

import functools

import jax
import jax.numpy as jnp

Array = jnp.ndarray


def forward(model, params, batch: dict, *, deterministic: bool = True, rngs=None) -> Array:
  """Logits [B, L, V] of `model` on `batch` (the dict a data pipeline yields)."""
  args, kwargs = model.batch_arguments(batch)
  return model.apply({'params': params}, *args, **kwargs, deterministic=deterministic, rngs=rngs)


def forward_with_memory(model, params, memory, batch: dict, *, deterministic: bool = True,
                        rngs=None) -> tuple[Array, dict]:
  """(logits [B, L, V], the memory after the batch) of a model with a Transformer-XL memory
  (config.memory_length): each row of `batch` continues the row of the batch that left `memory`
  (layers.Stack)."""
  args, kwargs = model.batch_arguments(batch)
  logits, updated = model.apply({'params': params, 'memory': memory}, *args, **kwargs,
                                deterministic=deterministic, rngs=rngs, mutable=['memory'])
  return logits, updated['memory']


def initial_memory(model, batch: dict) -> dict:
  """A Transformer-XL memory for the rows of `batch` that remembers nothing yet (all slots
  empty), or {} for a model without one."""
  def init(batch):
    args, kwargs = model.batch_arguments(batch)
    return model.init(jax.random.key(0), *args, **kwargs)

  shapes = jax.eval_shape(init, batch)  # batch: arrays or jax.ShapeDtypeStruct
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), dict(shapes.get('memory', {})))


def init_params(model, batch: dict, rng):
  """Freshly initialised parameters, boxed with their logical axis names (nn.Partitioned)."""
  args, kwargs = model.batch_arguments(batch)
  return model.init(rng, *args, **kwargs)['params']


def _token_losses(logits_NxV: Array, targets_N: Array, label_smoothing: float):
  """(smoothed loss, NLL, correct) per token, and the log-partition function (logsumexp)."""
  vocab_size = logits_NxV.shape[-1]
  max_N = logits_NxV.max(-1)
  shifted_NxV = logits_NxV - max_N[:, None]
  log_z_N = jnp.log(jnp.exp(shifted_NxV).sum(-1))  # log-partition of the shifted logits
  target_N = jnp.take_along_axis(shifted_NxV, targets_N[:, None], axis=-1)[:, 0]
  nll_N = log_z_N - target_N
  # Correct when the target holds the largest logit (ties count as correct): the row maximum is
  # already at hand, where argmax would be one more (slow, variadic) reduction over [N, V].
  correct_N = target_N >= 0.0
  if label_smoothing == 0.0:
    return (nll_N, nll_N, correct_N), max_N + log_z_N
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab_size - 1)
  # sum_v q_v (-log p_v) = confidence * nll + low * (sum_v -log p_v - nll)
  minus_log_p_sum_N = vocab_size * log_z_N - shifted_NxV.sum(-1)
  cross_entropy_N = confidence * nll_N + low * (minus_log_p_sum_N - nll_N)
  entropy = -(confidence * jnp.log(confidence) + (vocab_size - 1) * low * jnp.log(low))
  return (cross_entropy_N - entropy, nll_N, correct_N), max_N + log_z_N


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _fused_token_losses(logits_NxV, targets_N, label_smoothing):
  return _token_losses(logits_NxV, targets_N, label_smoothing)[0]


def _fused_forward(logits_NxV, targets_N, label_smoothing):
  outputs, logsumexp_N = _token_losses(logits_NxV, targets_N, label_smoothing)
  return outputs, (logits_NxV, targets_N, logsumexp_N)


def _fused_backward(label_smoothing, residuals, cotangents):
  """d/dlogits = g_loss (p - q) + g_nll (p - onehot): one elementwise pass over [N, V]."""
  logits_NxV, targets_N, logsumexp_N = residuals
  g_loss_N, g_nll_N, _ = cotangents
  vocab_size = logits_NxV.shape[-1]
  low = label_smoothing / (vocab_size - 1)
  p_NxV = jnp.exp(logits_NxV - logsumexp_N[:, None])
  is_target_NxV = targets_N[:, None] == jnp.arange(vocab_size)[None, :]
  target_weight_N = g_loss_N * (1.0 - label_smoothing - low) + g_nll_N
  grad_NxV = ((g_loss_N + g_nll_N)[:, None] * p_NxV - (g_loss_N * low)[:, None]
              - jnp.where(is_target_NxV, target_weight_N[:, None], 0.0))
  return grad_NxV, None


_fused_token_losses.defvjp(_fused_forward, _fused_backward)


def smoothed_cross_entropy(logits_BxLxV: Array, targets_BxL: Array,
                           label_smoothing: float) -> tuple[Array, Array, Array]:
  """Per-token (label-smoothed loss, unsmoothed NLL, target is the top logit), each [B, L].

  The smoothed loss is KL(q || p) with q = (1 - eps) on the target and eps / (V - 1) elsewhere:
  cross-entropy minus q's entropy, so that a perfect model (p = q) scores exactly 0.
  The gradient is written by hand (p - q), one pass over the logits where automatic
  differentiation of the same formula makes several: with argmax gone too, original:small's CPU
  step went from 625 to 556 ms.
  """
  batch, length, vocab_size = logits_BxLxV.shape
  outputs = _fused_token_losses(logits_BxLxV.astype(jnp.float32).reshape(-1, vocab_size),
                                targets_BxL.reshape(-1), label_smoothing)
  return tuple(x.reshape(batch, length) for x in outputs)


def loss_and_metrics(logits_BxLxV: Array, batch: dict, label_smoothing: float):
  """(loss_sum, metrics): the weighted sums; divide by metrics['weight'] for means."""
  weights_BxL = batch['weights'].astype(jnp.float32)
  loss_BxL, nll_BxL, correct_BxL = smoothed_cross_entropy(logits_BxLxV, batch['targets'],
                                                          label_smoothing)
  metrics = {
      'loss': (loss_BxL * weights_BxL).sum(),
      'nll': (nll_BxL * weights_BxL).sum(),
      'accuracy': (correct_BxL * weights_BxL).sum(),
      'weight': weights_BxL.sum(),
  }
  return metrics['loss'], metrics


def summarize(metric_sums: dict) -> dict:
  """Sums -> token-weighted means, plus perplexity from the unsmoothed NLL."""
  weight = max(float(metric_sums['weight']), 1e-9)
  out = {k: float(v) / weight for k, v in metric_sums.items() if k != 'weight'}
  out['ppl'] = float(jnp.exp(min(out['nll'], 50.0)))
  out['tokens'] = float(metric_sums['weight'])
  return out
