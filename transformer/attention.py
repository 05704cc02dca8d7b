"""Multi-head attention with an explicit boolean mask and a key/value cache for decoding.

Shape suffixes: B batch, Q queries, K keys, D model width, H heads, E head width (D = H * E),
C cache slots.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer import attention_kinds, masks, norms, positions

Array = jnp.ndarray
xavier = nn.initializers.xavier_uniform()


def dense(features: int, axes: tuple[str, str], dtype: Any, name: str, use_bias: bool = True):
  """A Xavier-initialised Dense layer whose kernel carries logical axis names for sharding."""
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, use_bias=use_bias, name=name,
                  kernel_init=nn.with_logical_partitioning(xavier, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))


# xla: the einsums of MultiHeadAttention._attend, which also give the attention weights to plots.
# cudnn | auto: jax.nn.dot_product_attention, cuDNN's fused kernel (GPU) or, for auto, whichever
# kernel the backend has (XLA's on CPU and TPU). Neither applies attention dropout.
IMPLS = ('xla', 'cudnn', 'auto')


class MultiHeadAttention(nn.Module):
  """softmax(Q K^T / sqrt(E) + bias + mask) V over H heads, then an output projection.

  num_kv_heads < num_heads is grouped-query attention (1: multi-query): query head h reads
  key/value head h // (num_heads / num_kv_heads), so consecutive query heads share one, and the
  decoding cache holds only the key/value heads. qk_norm normalises each head's queries and keys
  over E (with a learned scale) before the dot product; rope_theta rotates them by the positions
  of x's tokens (self-attention only; positions.rotary); logit_bias adds a per-head bias (T5's
  relative bias, ALiBi).

  With `decode=True` (self-attention only), new keys/values are written into a cache at
  `cache_slot` and the queries attend over the whole cache; the caller's mask then spans the
  cache ([B, 1, Q, C]). The cache is sized by the sequence length of the `init` call.

  attention_window (self-attention, not decoding): local attention computed block by block
  (attention_kinds.py); the caller's mask and logit bias are then those of the blocks
  ([B * N, 1, W, K] and [B * N, H, W, K]), and `causal` says which key blocks a block reads.
  low_rank_dim (bidirectional self-attention): Linformer's projection of the keys and values
  along the sequence (_project_length).
  """
  num_heads: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  use_bias: bool = False  # Biases on the four projections (BERT, GPT-2, Marian have them).
  num_kv_heads: Optional[int] = None  # None: num_heads (multi-head attention).
  scale_logits: bool = True  # False: no 1/sqrt(E) (T5 folds it into the initialisation).
  qk_norm: Optional[str] = None  # A norms.KINDS name: normalise queries and keys per head.
  norm_epsilon: float = 1e-6
  rope_theta: Optional[float] = None  # Rotary positions with this base (None: no rotation).
  attention_window: Optional[int] = None  # Local attention over this window (None: full).
  causal: bool = False  # Local attention: no key block after the query block is read.
  low_rank_dim: Optional[int] = None  # Linformer: keys and values projected to this many rows.
  max_len: int = 0  # low_rank_dim: the longest sequence its length projections take.
  impl: str = 'xla'  # An IMPLS name: how softmax(Q K^T) V is computed.

  @nn.compact
  def __call__(self, x_BxQxD: Array, kv_BxKxD: Array, mask_Bx1xQxK: Optional[Array], *,
               deterministic: bool, decode: bool = False, cache_slot: Optional[Array] = None,
               positions_BxQ: Optional[Array] = None,
               logit_bias_BxHxQxK: Optional[Array] = None,
               cache_index: Optional[int] = None) -> Array:
    d_model = x_BxQxD.shape[-1]
    num_kv_heads = self.num_kv_heads or self.num_heads
    if d_model % self.num_heads or self.num_heads % num_kv_heads:
      raise ValueError(f'd_model={d_model} must be divisible by num_heads={self.num_heads}, and '
                       f'num_heads by num_kv_heads={num_kv_heads}')
    head_dim = d_model // self.num_heads

    # By default no biases, as in the paper (W^Q, W^K, W^V, W^O); a key bias would get an
    # exactly-zero gradient (softmax is shift-invariant), which Adam turns into noisy updates.
    def project(x, heads, name):  # [B, L, D] -> [B, L, heads, E]
      y = dense(heads * head_dim, ('embed', 'heads'), self.dtype, name, use_bias=self.use_bias)(x)
      return y.reshape(*x.shape[:-1], heads, head_dim)

    q_BxQxHxE = project(x_BxQxD, self.num_heads, 'query')
    k_BxKxGxE = project(kv_BxKxD, num_kv_heads, 'key')  # G: key/value heads
    v_BxKxGxE = project(kv_BxKxD, num_kv_heads, 'value')
    if self.qk_norm:
      norm = lambda name: norms.make_norm(self.qk_norm, self.norm_epsilon, self.dtype, name,
                                          axis_name=None)
      q_BxQxHxE, k_BxKxGxE = norm('query_norm')(q_BxQxHxE), norm('key_norm')(k_BxKxGxE)
    if self.rope_theta:  # Self-attention: the new keys are the queries' tokens (cached rotated).
      q_BxQxHxE = positions.rotary(q_BxQxHxE, positions_BxQ, self.rope_theta)
      k_BxKxGxE = positions.rotary(k_BxKxGxE, positions_BxQ, self.rope_theta)

    if decode:
      k_BxKxGxE, v_BxKxGxE = self._update_cache(k_BxKxGxE, v_BxKxGxE, cache_slot, cache_index)
    if self.low_rank_dim:  # every query reads the r projected rows: no mask is left to apply
      k_BxKxGxE, v_BxKxGxE = self._project_length(k_BxKxGxE, v_BxKxGxE, mask_Bx1xQxK)
      mask_Bx1xQxK = None
    if self.attention_window and not decode:  # local: the same attention, a block at a time
      length = q_BxQxHxE.shape[1]
      q_idx_NxW, kv_idx_NxK = attention_kinds.local_blocks(length, self.attention_window,
                                                           self.causal)
      q_NxWxHxE, k_NxKxGxE, v_NxKxGxE = (
          attention_kinds.fold(attention_kinds.gather_blocks(x, idx))
          for x, idx in ((q_BxQxHxE, q_idx_NxW), (k_BxKxGxE, kv_idx_NxK),
                         (v_BxKxGxE, kv_idx_NxK)))
      out_NxWxHxE, _ = self._attend(q_NxWxHxE, k_NxKxGxE, v_NxKxGxE, mask_Bx1xQxK,
                                    logit_bias_BxHxQxK, deterministic)
      out_BxQxHxE = attention_kinds.unfold(out_NxWxHxE, q_BxQxHxE.shape[0])[:, :length]
    else:
      out_BxQxHxE, weights_BxHxQxK = self._attend(q_BxQxHxE, k_BxKxGxE, v_BxKxGxE, mask_Bx1xQxK,
                                                  logit_bias_BxHxQxK, deterministic)
      if weights_BxHxQxK is not None:
        self.sow('intermediates', 'attention_weights', weights_BxHxQxK)  # For visualization.
    out_BxQxD = out_BxQxHxE.reshape(*out_BxQxHxE.shape[:2], d_model)
    return dense(d_model, ('heads', 'embed'), self.dtype, 'out', use_bias=self.use_bias)(out_BxQxD)

  def _project_length(self, k_BxKxGxE, v_BxKxGxE, mask_Bx1xQxK):
    """Linformer: K' = E_k K and V' = E_v V, with learned E [r, max_len] (one per layer for keys
    and one for values, shared by the heads) sliced to the K keys; padding keys (those no query
    may read) are zeroed first, so they add nothing to the projected rows. -> [B, r, G, E] each.
    """
    length = k_BxKxGxE.shape[1]
    if length > self.max_len:
      raise ValueError(f'low-rank attention over {length} keys: its projections take at most '
                       f'max_len={self.max_len}')
    keep_BxK = (jnp.ones(k_BxKxGxE.shape[:2], bool) if mask_Bx1xQxK is None
                else jnp.any(mask_Bx1xQxK, axis=(1, 2)))
    keep_BxKx1x1 = keep_BxK[:, :, None, None].astype(k_BxKxGxE.dtype)
    init = nn.with_logical_partitioning(xavier, (None, None))
    projected = []
    for name, x_BxKxGxE in (('key_length_projection', k_BxKxGxE),
                            ('value_length_projection', v_BxKxGxE)):
      e_RxM = self.param(name, init, (self.low_rank_dim, self.max_len), jnp.float32)
      projected.append(jnp.einsum('rk,bkge->brge', e_RxM[:, :length].astype(self.dtype),
                                  x_BxKxGxE * keep_BxKx1x1))
    return tuple(projected)

  def _attend(self, q_BxQxHxE, k_BxKxGxE, v_BxKxGxE, mask_Bx1xQxK, logit_bias_BxHxQxK,
              deterministic):
    """softmax(Q K^T (/ sqrt(E)) + bias, where the mask allows) V, query head h reading key/value
    head h // (H / G). Returns (output, attention weights before dropout, or None where a fused
    kernel computed the output: with impl cudnn or auto, unless a caller collects the weights)."""
    if self.impl != 'xla' and not self.is_mutable_collection('intermediates'):
      if self.dropout_rate and not deterministic:
        raise ValueError(f'attention_impl={self.impl} has no attention dropout; use xla.')
      out_BxQxHxE = jax.nn.dot_product_attention(
          q_BxQxHxE, k_BxKxGxE, v_BxKxGxE, bias=logit_bias_BxHxQxK, mask=mask_Bx1xQxK,
          scale=None if self.scale_logits else 1.0,
          implementation='cudnn' if self.impl == 'cudnn' else None)
      return out_BxQxHxE, None
    batch, num_q, num_heads, head_dim = q_BxQxHxE.shape
    num_k, num_kv_heads = k_BxKxGxE.shape[1], k_BxKxGxE.shape[2]
    groups = num_heads // num_kv_heads
    if groups == 1:
      logits_BxHxQxK = jnp.einsum('bqhe,bkhe->bhqk', q_BxQxHxE, k_BxKxGxE)
    else:  # query head h = g * groups + r reads key/value head g
      q_BxQxGxRxE = q_BxQxHxE.reshape(batch, num_q, num_kv_heads, groups, head_dim)
      logits_BxHxQxK = jnp.einsum('bqgre,bkge->bgrqk', q_BxQxGxRxE, k_BxKxGxE).reshape(
          batch, num_heads, num_q, num_k)
    if self.scale_logits:
      logits_BxHxQxK = logits_BxHxQxK / jnp.sqrt(jnp.asarray(head_dim, self.dtype))
    logits_BxHxQxK = logits_BxHxQxK.astype(jnp.float32)
    if logit_bias_BxHxQxK is not None:
      logits_BxHxQxK = logits_BxHxQxK + logit_bias_BxHxQxK
    if mask_Bx1xQxK is not None:
      # A large finite negative (not -inf): a fully masked row (padding query) stays finite.
      logits_BxHxQxK = jnp.where(mask_Bx1xQxK, logits_BxHxQxK, jnp.finfo(jnp.float32).min)
    weights_BxHxQxK = jax.nn.softmax(logits_BxHxQxK, axis=-1).astype(self.dtype)
    dropped_BxHxQxK = nn.Dropout(self.dropout_rate)(weights_BxHxQxK, deterministic=deterministic)
    if groups == 1:
      return jnp.einsum('bhqk,bkhe->bqhe', dropped_BxHxQxK, v_BxKxGxE), weights_BxHxQxK
    dropped_BxGxRxQxK = dropped_BxHxQxK.reshape(batch, num_kv_heads, groups, num_q, num_k)
    return jnp.einsum('bgrqk,bkge->bqgre', dropped_BxGxRxQxK, v_BxKxGxE).reshape(
        batch, num_q, num_heads, head_dim), weights_BxHxQxK

  def _update_cache(self, k_BxQxHxE, v_BxQxHxE, cache_slot, cache_index):
    """Writes the new keys/values at slot `cache_slot` and returns the whole cache.

    cache_index names one cache per call of a layer shared by several depths (share_layers).
    """
    suffix = '' if cache_index is None else f'_{cache_index}'
    initialized = self.has_variable('cache', f'cached_key{suffix}')
    key_cache = self.variable('cache', f'cached_key{suffix}', jnp.zeros, k_BxQxHxE.shape,
                              k_BxQxHxE.dtype)
    value_cache = self.variable('cache', f'cached_value{suffix}', jnp.zeros, v_BxQxHxE.shape,
                                v_BxQxHxE.dtype)
    if not initialized:  # The init call only sizes the cache.
      return k_BxQxHxE, v_BxQxHxE
    start = (0, cache_slot, 0, 0)
    key_cache.value = jax.lax.dynamic_update_slice(key_cache.value, k_BxQxHxE, start)
    value_cache.value = jax.lax.dynamic_update_slice(value_cache.value, v_BxQxHxE, start)
    return key_cache.value, value_cache.value


class DecodeCursor(nn.Module):
  """Model-level decoding state: the next cache slot, which slots hold real tokens, and positions.

  Given the validity of Q new tokens, returns their first cache slot, their positions (pads
  between a prompt and its continuation do not advance positions), the [B, 1, Q, C]
  self-attention mask over the cache, for the 'causal' or 'prefix' mask kind (with local
  attention's window over positions), and the positions of every cached key [B, C] (for
  position-dependent logit biases).
  """
  kind: str
  window: Optional[int] = None  # local attention: only keys fewer positions away than this

  @nn.compact
  def __call__(self, valid_BxQ: Array, prefix_len_B: Optional[Array] = None):
    batch, num_new = valid_BxQ.shape
    initialized = self.has_variable('cache', 'slot')
    slot = self.variable('cache', 'slot', lambda: jnp.zeros((), jnp.int32))
    # The init call sizes the cache with the full decode length.
    kv_valid = self.variable('cache', 'kv_valid', jnp.zeros, (batch, num_new), jnp.bool_)
    next_position = self.variable('cache', 'next_position', jnp.zeros, (batch,), jnp.int32)
    kv_positions = self.variable('cache', 'kv_positions', jnp.zeros, (batch, num_new), jnp.int32)

    q_slots_Q = slot.value + jnp.arange(num_new)
    valid_int = valid_BxQ.astype(jnp.int32)
    positions_BxQ = next_position.value[:, None] + jnp.cumsum(valid_int, axis=1) - valid_int
    if initialized:
      kv_valid.value = jax.lax.dynamic_update_slice(kv_valid.value, valid_BxQ, (0, slot.value))
      kv_positions.value = jax.lax.dynamic_update_slice(kv_positions.value, positions_BxQ,
                                                        (0, slot.value))
      next_position.value = next_position.value + valid_int.sum(axis=1)
      slot.value = slot.value + num_new
      kv_valid_BxC, kv_positions_BxC = kv_valid.value, kv_positions.value
    else:
      kv_valid_BxC, kv_positions_BxC = valid_BxQ, positions_BxQ
    kv_slots_C = jnp.arange(kv_valid_BxC.shape[1])
    if self.kind == 'causal':
      structure = masks.causal_mask(q_slots_Q, kv_slots_C)
    elif self.kind == 'prefix':
      structure = masks.prefix_lm_mask(prefix_len_B, q_slots_Q, kv_slots_C)
    else:
      raise ValueError(f'Cannot decode incrementally with mask kind {self.kind!r}')
    local = None if self.window is None else masks.window_mask(positions_BxQ, kv_positions_BxC,
                                                                self.window)
    mask = masks.combine(masks.padding_mask(kv_valid_BxC), structure, local)
    return q_slots_Q[0], positions_BxQ, mask, kv_positions_BxC
