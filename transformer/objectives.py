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


def _call(fn, batch: dict, **kwargs):
  """Calls model.apply or model.init with the model arguments that `batch` holds."""
  if 'decoder_inputs' in batch:  # original: encoder-decoder.
    return fn(batch['inputs'], batch['decoder_inputs'],
              inputs_positions=batch.get('inputs_positions'),
              inputs_segment_ids=batch.get('inputs_segment_ids'),
              decoder_positions=batch.get('decoder_positions'),
              decoder_segment_ids=batch.get('decoder_segment_ids'), **kwargs)
  return fn(batch['inputs'], positions=batch.get('positions'),
            segment_ids=batch.get('segment_ids'), prefix_len=batch.get('prefix_len'),
            token_types=batch.get('token_types'), **kwargs)


def forward(model, params, batch: dict, *, deterministic: bool = True, rngs=None) -> Array:
  """Logits [B, L, V] of `model` on `batch` (the dict a data pipeline yields)."""
  return _call(functools.partial(model.apply, {'params': params}), batch,
               deterministic=deterministic, rngs=rngs)


def init_params(model, batch: dict, rng):
  """Freshly initialised parameters, boxed with their logical axis names (nn.Partitioned)."""
  return _call(functools.partial(model.init, rng), batch)['params']


def smoothed_cross_entropy(logits_BxLxV: Array, targets_BxL: Array,
                           label_smoothing: float) -> tuple[Array, Array]:
  """Per-token (label-smoothed loss, unsmoothed NLL), each [B, L].

  The smoothed loss is KL(q || p) with q = (1 - eps) on the target and eps / (V - 1) elsewhere:
  cross-entropy minus q's entropy, so that a perfect model (p = q) scores exactly 0.
  """
  vocab_size = logits_BxLxV.shape[-1]
  log_p_BxLxV = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
  # A one-hot product rather than take_along_axis: its gradient fuses into the softmax backward
  # instead of becoming a scatter into a [B, L, V] buffer.
  one_hot_BxLxV = jax.nn.one_hot(targets_BxL, vocab_size, dtype=log_p_BxLxV.dtype)
  nll_BxL = -(log_p_BxLxV * one_hot_BxLxV).sum(-1)
  if label_smoothing == 0.0:
    return nll_BxL, nll_BxL
  confidence = 1.0 - label_smoothing
  low = label_smoothing / (vocab_size - 1)
  # sum_v q_v (-log p_v) = confidence * nll + low * (sum_v -log p_v - nll)
  cross_entropy_BxL = confidence * nll_BxL + low * (-log_p_BxLxV.sum(-1) - nll_BxL)
  entropy = -(confidence * jnp.log(confidence) + (vocab_size - 1) * low * jnp.log(low))
  return cross_entropy_BxL - entropy, nll_BxL


def loss_and_metrics(logits_BxLxV: Array, batch: dict, label_smoothing: float):
  """(loss_sum, metrics): the weighted sums; divide by metrics['weight'] for means."""
  weights_BxL = batch['weights'].astype(jnp.float32)
  loss_BxL, nll_BxL = smoothed_cross_entropy(logits_BxLxV, batch['targets'], label_smoothing)
  correct_BxL = logits_BxLxV.argmax(-1) == batch['targets']
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
