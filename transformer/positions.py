"""Positional schemes: added to the embeddings (sinusoidal, learned), rotating queries and keys
(rotary), or biasing the attention logits (T5's bucketed relative bias, ALiBi).

config.positional picks one:

  sinusoidal      the paper's fixed PE(pos) added to the token embeddings
  learned         a learned table added to the token embeddings (BERT, GPT-2)
  rotary          queries and keys rotated by angle pos * theta^(-2i/E) (RoFormer; Llama)
  relative_bias   a learned scalar per head and distance bucket added to the logits (T5)
  alibi           a fixed per-head linear penalty on the distance (ALiBi)

Positions are explicit [B, L] ints (packed rows restart at 0; cached decoding skips pads), so the
same functions serve training and decoding. Shape suffixes: B batch, Q queries, K keys, L length,
H heads, E head width, D width.
"""

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

Array = jnp.ndarray

ADDED = ('sinusoidal', 'learned')  # added to the embeddings
ROTARY = 'rotary'
LOGIT_BIASES = ('relative_bias', 'alibi')  # added to the attention logits
KINDS = ADDED + (ROTARY,) + LOGIT_BIASES
RELATIVE = (ROTARY,) + LOGIT_BIASES  # scores depend on distances only (a Transformer-XL memory)
SINUSOIDAL_LAYOUTS = ('interleaved', 'halves')


def sinusoidal_encoding(positions_BxL: Array, d_model: int, layout: str = 'interleaved') -> Array:
  """PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(...). -> [B, L, D] float32.

  layout 'interleaved' is the paper's (sin, cos, sin, cos, ...); 'halves' puts every sine first
  and every cosine after them (the same features, permuted; Marian and tensor2tensor do this).
  """
  if layout not in SINUSOIDAL_LAYOUTS:
    raise ValueError(f'sinusoidal_layout must be one of {", ".join(SINUSOIDAL_LAYOUTS)}, '
                     f'got {layout!r}')
  inv_freq_H = np.exp(-np.log(10000.0) * np.arange(0, d_model, 2) / d_model)  # H = D/2
  angles_BxLxH = jnp.einsum('bl,h->blh', positions_BxL.astype(jnp.float32), inv_freq_H)
  axis = -1 if layout == 'interleaved' else -2
  encoding = jnp.stack([jnp.sin(angles_BxLxH), jnp.cos(angles_BxLxH)], axis=axis)
  return encoding.reshape(*positions_BxL.shape, d_model)


def rotary(x_BxLxHxE: Array, positions_BxL: Array, theta: float) -> Array:
  """Rotates each head's (x_i, x_{i+E/2}) pair by pos * theta^(-2i/E).

  The pairs are the two halves of the head (GPT-NeoX and Hugging Face Llama), not adjacent
  features (the RoFormer paper): the same rotation up to a fixed permutation of the projection's
  columns. q.k then depends on the positions only through their difference.
  """
  head_dim = x_BxLxHxE.shape[-1]
  inv_freq_F = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)  # F = E/2
  angles_BxLxF = positions_BxL.astype(jnp.float32)[..., None] * inv_freq_F[None, None, :]
  cos_BxLx1xF, sin_BxLx1xF = jnp.cos(angles_BxLxF)[:, :, None], jnp.sin(angles_BxLxF)[:, :, None]
  x = x_BxLxHxE.astype(jnp.float32)
  first, second = x[..., :head_dim // 2], x[..., head_dim // 2:]
  rotated = jnp.concatenate([first * cos_BxLx1xF - second * sin_BxLx1xF,
                             second * cos_BxLx1xF + first * sin_BxLx1xF], axis=-1)
  return rotated.astype(x_BxLxHxE.dtype)


def t5_bucket(relative_BxQxK: Array, *, bidirectional: bool, num_buckets: int,
              max_distance: int) -> Array:
  """T5's bucket of key position - query position: exact below num_buckets/2 (per direction),
  logarithmic up to max_distance, then the last bucket. Causal (not bidirectional) stacks bucket
  only the past; a bidirectional one gives the future the upper half of the buckets."""
  buckets = jnp.zeros_like(relative_BxQxK)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (relative_BxQxK > 0) * num_buckets
    distance = jnp.abs(relative_BxQxK)
  else:
    distance = -jnp.minimum(relative_BxQxK, 0)
  max_exact = num_buckets // 2
  log_ratio = (jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
               / math.log(max_distance / max_exact))
  large = max_exact + (log_ratio * (num_buckets - max_exact)).astype(relative_BxQxK.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(distance < max_exact, distance, large)


class RelativeBias(nn.Module):
  """T5's learned bias: a scalar per head and bucket; one table per stack, shared by its layers."""
  num_heads: int
  num_buckets: int = 32
  max_distance: int = 128
  bidirectional: bool = True

  @nn.compact
  def __call__(self, q_positions_BxQ: Array, kv_positions_BxK: Array) -> Array:
    table_NxH = self.param('embedding', nn.with_logical_partitioning(
        nn.initializers.normal(1.0), (None, 'heads')), (self.num_buckets, self.num_heads),
                           jnp.float32)
    relative_BxQxK = kv_positions_BxK[:, None, :] - q_positions_BxQ[:, :, None]
    bucket_BxQxK = t5_bucket(relative_BxQxK, bidirectional=self.bidirectional,
                             num_buckets=self.num_buckets, max_distance=self.max_distance)
    return jnp.moveaxis(table_NxH[bucket_BxQxK], -1, 1)  # [B, H, Q, K]


def alibi_slopes(num_heads: int) -> np.ndarray:
  """ALiBi's head slopes: the geometric sequence 2^(-8/n), 2^(-16/n), ... for n a power of two;
  otherwise those of the next lower power of two, then every other slope of the next higher."""
  def power_of_two(n):
    return 2.0 ** (-8.0 * np.arange(1, n + 1) / n)
  lower = 2 ** int(math.floor(math.log2(num_heads)))
  if lower == num_heads:
    return power_of_two(num_heads)
  return np.concatenate([power_of_two(lower), power_of_two(2 * lower)[::2][:num_heads - lower]])


def alibi_bias(q_positions_BxQ: Array, kv_positions_BxK: Array, num_heads: int) -> Array:
  """-slope_h * |q - k| per head: [B, H, Q, K] (causal masks leave only k <= q)."""
  distance_BxQxK = jnp.abs(q_positions_BxQ[:, :, None] - kv_positions_BxK[:, None, :])
  slopes_H = jnp.asarray(alibi_slopes(num_heads), jnp.float32)
  return -slopes_H[None, :, None, None] * distance_BxQxK[:, None].astype(jnp.float32)
