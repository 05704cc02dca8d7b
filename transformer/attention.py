"""Multi-head attention with an explicit boolean mask and a key/value cache for decoding.

Shape suffixes: B batch, Q queries, K keys, D model width, H heads, E head width (D = H * E),
C cache slots.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer import masks

Array = jnp.ndarray
xavier = nn.initializers.xavier_uniform()


def dense(features: int, axes: tuple[str, str], dtype: Any, name: str, use_bias: bool = True):
  """A Xavier-initialised Dense layer whose kernel carries logical axis names for sharding."""
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, use_bias=use_bias, name=name,
                  kernel_init=nn.with_logical_partitioning(xavier, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


class MultiHeadAttention(nn.Module):
  """softmax(Q K^T / sqrt(E) + mask) V over H heads, then an output projection.

  With `decode=True` (self-attention only), new keys/values are written into a cache at
  `cache_slots` and the queries attend over the whole cache; the caller's mask then spans the
  cache ([B, 1, Q, C]). The cache is sized by the sequence length of the `init` call.
  """
  num_heads: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  use_bias: bool = False  # Biases on the four projections (BERT, GPT-2, Marian have them).

  @nn.compact
  def __call__(self, x_BxQxD: Array, kv_BxKxD: Array, mask_Bx1xQxK: Optional[Array], *,
               deterministic: bool, decode: bool = False,
               cache_slot: Optional[Array] = None) -> Array:
    d_model = x_BxQxD.shape[-1]
    if d_model % self.num_heads:
      raise ValueError(f'd_model={d_model} is not divisible by num_heads={self.num_heads}')
    head_dim = d_model // self.num_heads

    # By default no biases, as in the paper (W^Q, W^K, W^V, W^O); a key bias would get an
    # exactly-zero gradient (softmax is shift-invariant), which Adam turns into noisy updates.
    def project(x, name):  # [B, L, D] -> [B, L, H, E]
      y = dense(d_model, ('embed', 'heads'), self.dtype, name, use_bias=self.use_bias)(x)
      return y.reshape(*x.shape[:-1], self.num_heads, head_dim)

    q_BxQxHxE = project(x_BxQxD, 'query')
    k_BxKxHxE = project(kv_BxKxD, 'key')
    v_BxKxHxE = project(kv_BxKxD, 'value')

    if decode:
      k_BxKxHxE, v_BxKxHxE = self._update_cache(k_BxKxHxE, v_BxKxHxE, cache_slot)

    logits_BxHxQxK = jnp.einsum('bqhe,bkhe->bhqk', q_BxQxHxE, k_BxKxHxE) / jnp.sqrt(
        jnp.asarray(head_dim, self.dtype))
    logits_BxHxQxK = logits_BxHxQxK.astype(jnp.float32)
    if mask_Bx1xQxK is not None:
      # A large finite negative (not -inf): a fully masked row (padding query) stays finite.
      logits_BxHxQxK = jnp.where(mask_Bx1xQxK, logits_BxHxQxK, jnp.finfo(jnp.float32).min)
    weights_BxHxQxK = jax.nn.softmax(logits_BxHxQxK, axis=-1).astype(self.dtype)
    self.sow('intermediates', 'attention_weights', weights_BxHxQxK)  # For visualization.
    weights_BxHxQxK = nn.Dropout(self.dropout_rate)(weights_BxHxQxK, deterministic=deterministic)
    out_BxQxHxE = jnp.einsum('bhqk,bkhe->bqhe', weights_BxHxQxK, v_BxKxHxE)
    out_BxQxD = out_BxQxHxE.reshape(*out_BxQxHxE.shape[:2], d_model)
    return dense(d_model, ('heads', 'embed'), self.dtype, 'out', use_bias=self.use_bias)(out_BxQxD)

  def _update_cache(self, k_BxQxHxE, v_BxQxHxE, cache_slot):
    """Writes the new keys/values at slot `cache_slot` and returns the whole cache."""
    initialized = self.has_variable('cache', 'cached_key')
    key_cache = self.variable('cache', 'cached_key', jnp.zeros, k_BxQxHxE.shape, k_BxQxHxE.dtype)
    value_cache = self.variable('cache', 'cached_value', jnp.zeros, v_BxQxHxE.shape, v_BxQxHxE.dtype)
    if not initialized:  # The init call only sizes the cache.
      return k_BxQxHxE, v_BxQxHxE
    start = (0, cache_slot, 0, 0)
    key_cache.value = jax.lax.dynamic_update_slice(key_cache.value, k_BxQxHxE, start)
    value_cache.value = jax.lax.dynamic_update_slice(value_cache.value, v_BxQxHxE, start)
    return key_cache.value, value_cache.value


class DecodeCursor(nn.Module):
  """Model-level decoding state: the next cache slot, which slots hold real tokens, and positions.

  Given the validity of Q new tokens, returns their cache slots, their positions (pads between a
  prompt and its continuation do not advance positions) and the [B, 1, Q, C] self-attention mask
  over the cache, for the 'causal' or 'prefix' mask kind.
  """
  kind: str

  @nn.compact
  def __call__(self, valid_BxQ: Array, prefix_len_B: Optional[Array] = None):
    batch, num_new = valid_BxQ.shape
    initialized = self.has_variable('cache', 'slot')
    slot = self.variable('cache', 'slot', lambda: jnp.zeros((), jnp.int32))
    # The init call sizes the cache with the full decode length.
    kv_valid = self.variable('cache', 'kv_valid', jnp.zeros, (batch, num_new), jnp.bool_)
    next_position = self.variable('cache', 'next_position', jnp.zeros, (batch,), jnp.int32)

    q_slots_Q = slot.value + jnp.arange(num_new)
    valid_int = valid_BxQ.astype(jnp.int32)
    positions_BxQ = next_position.value[:, None] + jnp.cumsum(valid_int, axis=1) - valid_int
    if initialized:
      kv_valid.value = jax.lax.dynamic_update_slice(kv_valid.value, valid_BxQ, (0, slot.value))
      next_position.value = next_position.value + valid_int.sum(axis=1)
      slot.value = slot.value + num_new
      kv_valid_BxC = kv_valid.value
    else:
      kv_valid_BxC = valid_BxQ
    kv_slots_C = jnp.arange(kv_valid_BxC.shape[1])
    if self.kind == 'causal':
      structure = masks.causal_mask(q_slots_Q, kv_slots_C)
    elif self.kind == 'prefix':
      structure = masks.prefix_lm_mask(prefix_len_B, q_slots_Q, kv_slots_C)
    else:
      raise ValueError(f'Cannot decode incrementally with mask kind {self.kind!r}')
    mask = masks.combine(masks.padding_mask(kv_valid_BxC), structure)
    return q_slots_Q[0], positions_BxQ, mask
