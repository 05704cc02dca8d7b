"""Multi-head attention with an explicit boolean mask and a key/value cache for decoding.

Shape suffixes: B batch, Q queries, K keys, D model width, H heads, E head width (D = H * E),
C cache slots.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer import attention_kinds, masks, norms, positions, precision

Array = jnp.ndarray
xavier = nn.initializers.xavier_uniform()
# Cache entries of a cross-attention's keys and values (fixed_kv): the same for every beam of an
# example, so beam search need not reorder them (decode._take_parents).
FIXED_KV_CACHE = ('fixed_key', 'fixed_value')


def dense(features: int, axes: tuple[str, str], dtype: Any, name: str, use_bias: bool = True):
  """A Xavier-initialised Dense layer whose kernel carries logical axis names for sharding; its
  product in the compute dtype `dtype` (precision.py), its input and output float32."""
  return nn.Dense(features, dtype=jnp.float32, param_dtype=jnp.float32, use_bias=use_bias,
                  name=name, dot_general=precision.dense_product(dtype),
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
  of x's tokens, the keys by kv_positions_BxK where kv is more than x (a Transformer-XL memory
  followed by x) (self-attention only; positions.rotary); logit_bias adds a per-head bias (T5's
  relative bias, ALiBi).

  With `decode=True` (self-attention), new keys/values are written into a cache at
  `cache_slot` and the queries attend over the whole cache; the caller's mask then spans the
  cache ([B, 1, Q, C]). The cache is sized by the sequence length of the `init` call, except
  with ring_cache_size (local attention): a ring buffer of that many slots per row, written at
  the slots `cache_slot` [B, Q], and the queries attend over the ring as it was, followed by the
  new keys ([B, 1, Q, C + Q]; DecodeCursor says which slots hold what).
  fixed_kv (cross-attention): the keys and values come from a sequence that decoding does not
  change (the encoder's output), so with `decode=True` they are projected once, by the first call
  after the cache is initialised (decode.py makes it with no new tokens), and read from the cache
  (FIXED_KV_CACHE) at every later step instead of being projected again.

  attention_window (self-attention, not decoding): local attention computed block by block
  (attention_kinds.py); the caller's mask and logit bias are then those of the blocks
  ([B * N, 1, W, K] and [B * N, H, W, K]), and `causal` says which key blocks a block reads.
  num_global_tokens = g (Longformer's global attention, with attention_window): each block's
  keys end with the g global keys, and the g global queries read every key in a block of their
  own (_local_attend); the caller's mask and logit bias are then pairs, one per part
  ([B * N, 1, W, K + g], [B, 1, g, L]; the biases with H for 1). Decoding reads a linear cache
  under the caller's mask, which holds the global pairs (DecodeCursor).
  low_rank_dim (bidirectional self-attention): Linformer's projection of the keys and values
  along the sequence (_project_length).
  stride (self-attention): strided attention, its local and strided parts computed block by
  block and joined in one softmax (_strided_attend); the caller's mask and logit bias are then
  pairs, one per part ([B * N, 1, W, K], [B * S, 1, N, N]; the biases with H for 1). Decoding
  reads the cache under the caller's (strided) mask.
  lsh_buckets (self-attention, not decoding): Reformer's LSH attention (_lsh_attend), with no
  key projection; the caller's mask is then a masks.TokenMask.
  """
  num_heads: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32  # The products' input dtype (precision.py); activations are float32.
  use_bias: bool = False  # Biases on the four projections (BERT, GPT-2, Marian have them).
  num_kv_heads: Optional[int] = None  # None: num_heads (multi-head attention).
  scale_logits: bool = True  # False: no 1/sqrt(E) (T5 folds it into the initialisation).
  qk_norm: Optional[str] = None  # A norms.KINDS name: normalise queries and keys per head.
  norm_epsilon: float = 1e-6
  rope_theta: Optional[float] = None  # Rotary positions with this base (None: no rotation).
  attention_window: Optional[int] = None  # Local attention over this window (None: full).
  causal: bool = False  # Local attention: no key block after the query block is read.
  stride: Optional[int] = None  # Strided attention (Sparse Transformer): its window and stride.
  lsh_buckets: Optional[int] = None  # LSH attention (Reformer): buckets per hashing round.
  lsh_rounds: int = 1  # LSH attention: hashing rounds.
  lsh_chunk: int = 0  # LSH attention: a query reads keys fewer places away in the sorted order.
  low_rank_dim: Optional[int] = None  # Linformer: keys and values projected to this many rows.
  max_len: int = 0  # low_rank_dim: the longest sequence its length projections take.
  impl: str = 'xla'  # An IMPLS name: how softmax(Q K^T) V is computed.
  ring_cache_size: Optional[int] = None  # Decoding: a ring-buffer cache of this many slots.
  num_global_tokens: int = 0  # Local attention: the first this many tokens are global.
  fixed_kv: bool = False  # Cross-attention: decoding projects kv once and caches the result.

  @nn.compact
  def __call__(self, x_BxQxD: Array, kv_BxKxD: Array, mask_Bx1xQxK: Optional[Array], *,
               deterministic: bool, decode: bool = False, cache_slot: Optional[Array] = None,
               positions_BxQ: Optional[Array] = None,
               logit_bias_BxHxQxK: Optional[Array] = None,
               cache_index: Optional[int] = None,
               kv_positions_BxK: Optional[Array] = None) -> Array:
    d_model = x_BxQxD.shape[-1]
    num_kv_heads = self.num_kv_heads or self.num_heads
    if d_model % self.num_heads or self.num_heads % num_kv_heads:
      raise ValueError(f'd_model={d_model} must be divisible by num_heads={self.num_heads}, and '
                       f'num_heads by num_kv_heads={num_kv_heads}')
    head_dim = d_model // self.num_heads
    if decode and self.lsh_buckets:
      raise ValueError('config.attention_kind=lsh has no cached decoding: its buckets and their '
                       'order are those of the whole sequence (decode.py recomputes the prefix '
                       'at every step instead).')

    # By default no biases, as in the paper (W^Q, W^K, W^V, W^O); a key bias would get an
    # exactly-zero gradient (softmax is shift-invariant), which Adam turns into noisy updates.
    def project(x, heads, name):  # [B, L, D] -> [B, L, heads, E]
      y = dense(heads * head_dim, ('embed', 'heads'), self.dtype, name, use_bias=self.use_bias)(x)
      return y.reshape(*x.shape[:-1], heads, head_dim)

    norm = lambda name: norms.make_norm(self.qk_norm, self.norm_epsilon, name, axis_name=None)
    q_BxQxHxE = project(x_BxQxD, self.num_heads, 'query')
    if self.qk_norm:
      q_BxQxHxE = norm('query_norm')(q_BxQxHxE)

    def keys_values():  # G: key/value heads
      # lsh (Reformer's shared-QK): no key projection, the keys are the queries (unit-normalised
      # in _lsh_attend).
      k_BxKxGxE = q_BxQxHxE if self.lsh_buckets else project(kv_BxKxD, num_kv_heads, 'key')
      if self.qk_norm:
        k_BxKxGxE = norm('key_norm')(k_BxKxGxE)
      return k_BxKxGxE, project(kv_BxKxD, num_kv_heads, 'value')

    if decode and self.fixed_kv:
      k_BxKxGxE, v_BxKxGxE = self._fixed_kv_cache(keys_values, cache_index)
    else:
      k_BxKxGxE, v_BxKxGxE = keys_values()
    if self.rope_theta:  # Self-attention: the new keys are the queries' tokens (cached rotated),
      # or a segment memory's tokens followed by them (kv_positions_BxK).
      q_BxQxHxE = positions.rotary(q_BxQxHxE, positions_BxQ, self.rope_theta)
      k_BxKxGxE = positions.rotary(k_BxKxGxE, positions_BxQ if kv_positions_BxK is None
                                   else kv_positions_BxK, self.rope_theta)

    if decode and not self.fixed_kv:
      k_BxKxGxE, v_BxKxGxE = self._update_cache(k_BxKxGxE, v_BxKxGxE, cache_slot, cache_index)
    if self.low_rank_dim:  # every query reads the r projected rows: no mask is left to apply
      k_BxKxGxE, v_BxKxGxE = self._project_length(k_BxKxGxE, v_BxKxGxE, mask_Bx1xQxK)
      mask_Bx1xQxK = None
    if self.lsh_buckets:  # sorted by hash: a query reads the nearest keys in its bucket
      out_BxQxHxE = self._lsh_attend(q_BxQxHxE, k_BxKxGxE, v_BxKxGxE, mask_Bx1xQxK,
                                     deterministic)
    elif self.stride and not decode:  # strided: a local and a strided part, one softmax
      out_BxQxHxE = self._strided_attend(q_BxQxHxE, k_BxKxGxE, v_BxKxGxE, mask_Bx1xQxK,
                                         logit_bias_BxHxQxK, deterministic)
    elif self.attention_window and not decode:  # local: the same attention, a block at a time
      out_BxQxHxE = self._local_attend(q_BxQxHxE, k_BxKxGxE, v_BxKxGxE, mask_Bx1xQxK,
                                       logit_bias_BxHxQxK, deterministic)
    else:
      out_BxQxHxE, weights_BxHxQxK = self._attend(q_BxQxHxE, k_BxKxGxE, v_BxKxGxE, mask_Bx1xQxK,
                                                  logit_bias_BxHxQxK, deterministic)
      if weights_BxHxQxK is not None:
        self.sow('intermediates', 'attention_weights', weights_BxHxQxK)  # For visualization.
    out_BxQxD = out_BxQxHxE.reshape(*out_BxQxHxE.shape[:2], d_model)
    return dense(d_model, ('heads', 'embed'), self.dtype, 'out', use_bias=self.use_bias)(out_BxQxD)

  def _local_attend(self, q_BxQxHxE, k_BxKxGxE, v_BxKxGxE, mask, logit_bias, deterministic):
    """Local attention (attention_kinds.py): the blocks under their mask and bias; with global
    tokens, the blocks' keys end with the global keys, and the global queries' rows are those of
    their own block over every key (mask and bias are then pairs, one per part). -> [B, Q, H, E].
    """
    batch, length = q_BxQxHxE.shape[:2]
    parts = attention_kinds.local_parts(length, self.attention_window, self.causal,
                                        self.num_global_tokens)
    if len(parts) == 1:  # no global tokens: the caller's mask and bias are the blocks' own
      mask, logit_bias = (mask,), (logit_bias,)
    outs = []
    for (q_idx_NxW, kv_idx_NxK), mask_Nx1xWxK, bias_NxHxWxK in zip(
        parts, mask, logit_bias or (None, None)):
      q_NxWxHxE, k_NxKxGxE, v_NxKxGxE = attention_kinds.qkv_blocks(
          q_BxQxHxE, k_BxKxGxE, v_BxKxGxE, q_idx_NxW, kv_idx_NxK)
      out_NxWxHxE, _ = self._attend(q_NxWxHxE, k_NxKxGxE, v_NxKxGxE, mask_Nx1xWxK, bias_NxHxWxK,
                                    deterministic)
      outs.append(attention_kinds.unfold(out_NxWxHxE, batch))
    out_BxQxHxE = outs[0][:, :length]
    if len(outs) > 1:  # the global queries read every key in their own block
      out_BxQxHxE = out_BxQxHxE.at[:, :outs[1].shape[1]].set(outs[1])
    return out_BxQxHxE

  def _strided_attend(self, q_BxQxHxE, k_BxKxGxE, v_BxKxGxE, part_masks, part_biases,
                      deterministic):
    """Strided attention (attention_kinds.py): each part's blocks under its mask and bias, the
    parts joined in one softmax over the union of their keys. -> [B, Q, H, E]."""
    batch, length = q_BxQxHxE.shape[:2]
    outs, lses = [], []
    for (q_idx_NxW, kv_idx_NxK), mask_Nx1xWxK, bias_NxHxWxK in zip(
        attention_kinds.strided_parts(length, self.stride, self.causal), part_masks,
        part_biases or (None, None)):
      q_NxWxHxE, k_NxKxGxE, v_NxKxGxE = attention_kinds.qkv_blocks(
          q_BxQxHxE, k_BxKxGxE, v_BxKxGxE, q_idx_NxW, kv_idx_NxK)
      out_NxWxHxE, lse_NxHxW = self._attend_part(q_NxWxHxE, k_NxKxGxE, v_NxKxGxE, mask_Nx1xWxK,
                                                 bias_NxHxWxK, deterministic)
      outs.append(attention_kinds.in_query_order(out_NxWxHxE, q_idx_NxW, batch, length))
      lses.append(attention_kinds.in_query_order(jnp.swapaxes(lse_NxHxW, 1, 2), q_idx_NxW,
                                                 batch, length))
    return attention_kinds.combine_by_logsumexp(jnp.stack(outs), jnp.stack(lses))

  def _lsh_attend(self, q_BxLxHxE, k_BxLxHxE, v_BxLxGxE, token_mask, deterministic):
    """Reformer's LSH attention (attention_kinds.py): the keys k (the queries) unit-normalised,
    hashed and sorted per round and head; in each round, local attention over the sorted order
    (blocks of lsh_chunk sorted places) within the query's bucket, under the ordinary mask
    (token_mask, by the tokens' indices in the row), the query's own key penalised; the rounds
    joined in one softmax. -> [B, L, H, E]."""
    batch, length, num_heads, head_dim = q_BxLxHxE.shape
    rounds = self.lsh_rounds
    # Shared-QK's key: the query unit-normalised (the 1e-6 keeps a zero query's key finite).
    k_f32 = k_BxLxHxE.astype(jnp.float32)
    k_BxLxHxE = (k_f32 * jax.lax.rsqrt(jnp.sum(k_f32 * k_f32, -1, keepdims=True) + 1e-6)).astype(
        q_BxLxHxE.dtype)
    # Fresh rotations at every training step; fixed ones elsewhere, for reproducible outputs.
    rng = (self.make_rng('dropout') if not deterministic
           else jax.random.key(attention_kinds.LSH_EVAL_SEED))
    rotations_RxHxExF = attention_kinds.lsh_rotations(rng, rounds, num_heads, head_dim,
                                                      self.lsh_buckets)
    buckets_BxRxHxL = attention_kinds.lsh_buckets(k_BxLxHxE, rotations_RxHxExF)
    order_BxRxHxL = attention_kinds.lsh_order(buckets_BxRxHxL, token_mask.valid_BxL,
                                              self.lsh_buckets)
    # Blocks of sorted places (those >= L do not exist), and the token at each place.
    q_idx_NxW, kv_idx_NxK = attention_kinds.local_blocks(length, self.lsh_chunk, self.causal)
    token_at = lambda idx: order_BxRxHxL[..., np.clip(idx, 0, length - 1)]
    q_token_BxRxHxNxW, kv_token_BxRxHxNxK = token_at(q_idx_NxW), token_at(kv_idx_NxK)
    bucket_at = lambda token: jnp.take_along_axis(
        buckets_BxRxHxL, token.reshape(*token.shape[:3], -1), axis=-1).reshape(token.shape)
    # Keys at existing sorted places fewer than lsh_chunk from the query's, in its bucket.
    exists_NxK = (kv_idx_NxK >= 0) & (kv_idx_NxK < length)
    places_NxWxK = (masks.window_mask(q_idx_NxW, kv_idx_NxK, self.lsh_chunk)[:, 0]
                    & exists_NxK[:, None, :])
    mask_BxRxHxNxWxK = (masks.token_pairs_mask(token_mask, q_token_BxRxHxNxW, kv_token_BxRxHxNxK)
                        & (bucket_at(q_token_BxRxHxNxW)[..., :, None]
                           == bucket_at(kv_token_BxRxHxNxK)[..., None, :])
                        & places_NxWxK[None, None, None])
    itself_BxRxHxNxWxK = q_token_BxRxHxNxW[..., :, None] == kv_token_BxRxHxNxK[..., None, :]

    def blocks(x_BxLxHxE, token_BxRxHxNxT):  # -> [B * R * H * N, T, 1, E]: heads in the batch
      x_BxRxHxLxE = jnp.broadcast_to(jnp.swapaxes(x_BxLxHxE, 1, 2)[:, None],
                                     (batch, rounds, num_heads, length, head_dim))
      token_BxRxHxNT = token_BxRxHxNxT.reshape(batch, rounds, num_heads, -1)
      return jnp.take_along_axis(x_BxRxHxLxE, token_BxRxHxNT[..., None], axis=3).reshape(
          -1, token_BxRxHxNxT.shape[-1], 1, head_dim)

    v_BxLxHxE = jnp.repeat(v_BxLxGxE, num_heads // v_BxLxGxE.shape[2], axis=2)
    width, num_k = q_idx_NxW.shape[1], kv_idx_NxK.shape[1]
    out_BRHNxWx1xE, lse_BRHNx1xW = self._attend_part(
        blocks(q_BxLxHxE, q_token_BxRxHxNxW), blocks(k_BxLxHxE, kv_token_BxRxHxNxK),
        blocks(v_BxLxHxE, kv_token_BxRxHxNxK), mask_BxRxHxNxWxK.reshape(-1, 1, width, num_k),
        (-attention_kinds.LSH_SELF_PENALTY * itself_BxRxHxNxWxK).reshape(-1, 1, width, num_k),
        deterministic)
    # Back from sorted places to the tokens' order: place p holds token order[p].
    unsort_BxRxHxL = jnp.argsort(order_BxRxHxL, axis=-1)
    out_BxRxHxLxE = jnp.take_along_axis(
        out_BRHNxWx1xE.reshape(batch, rounds, num_heads, -1, head_dim)[..., :length, :],
        unsort_BxRxHxL[..., None], axis=3)
    lse_BxRxHxL = jnp.take_along_axis(
        lse_BRHNx1xW.reshape(batch, rounds, num_heads, -1)[..., :length], unsort_BxRxHxL,
        axis=3)
    return attention_kinds.combine_by_logsumexp(jnp.moveaxis(out_BxRxHxLxE, (1, 2), (0, 3)),
                                                jnp.moveaxis(lse_BxRxHxL, (1, 2), (0, 3)))

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
      projected.append(precision.einsum('rk,bkge->brge', e_RxM[:, :length],
                                        x_BxKxGxE * keep_BxKx1x1, self.dtype))
    return tuple(projected)

  def _attend(self, q_BxQxHxE, k_BxKxGxE, v_BxKxGxE, mask_Bx1xQxK, logit_bias_BxHxQxK,
              deterministic):
    """softmax(Q K^T (/ sqrt(E)) + bias, where the mask allows) V, query head h reading key/value
    head h // (H / G). Returns (output, attention weights before dropout, or None where a fused
    kernel computed the output: with impl cudnn or auto, unless a caller collects the weights)."""
    if self.impl != 'xla' and not self.is_mutable_collection('intermediates'):
      if self.dropout_rate and not deterministic:
        raise ValueError(f'attention_impl={self.impl} has no attention dropout; use xla.')
      narrow = lambda x: None if x is None else x.astype(self.dtype)  # as the einsums'
      out_BxQxHxE = jax.nn.dot_product_attention(
          narrow(q_BxQxHxE), narrow(k_BxKxGxE), narrow(v_BxKxGxE),
          bias=narrow(logit_bias_BxHxQxK), mask=mask_Bx1xQxK,
          scale=None if self.scale_logits else 1.0,
          implementation='cudnn' if self.impl == 'cudnn' else None)
      return out_BxQxHxE.astype(jnp.float32), None
    weights_BxHxQxK = jax.nn.softmax(
        self._logits(q_BxQxHxE, k_BxKxGxE, mask_Bx1xQxK, logit_bias_BxHxQxK),
        axis=-1)
    return self._mix(weights_BxHxQxK, v_BxKxGxE, deterministic), weights_BxHxQxK

  def _attend_part(self, q_BxQxHxE, k_BxKxGxE, v_BxKxGxE, mask_Bx1xQxK, logit_bias_BxHxQxK,
                   deterministic):
    """_attend over one of several key sets that share one softmax (a strided pass's parts, an
    lsh pass's rounds): (output, logsumexp of the logits [B, H, Q]), which
    attention_kinds.combine_by_logsumexp combines."""
    logits_BxHxQxK = self._logits(q_BxQxHxE, k_BxKxGxE, mask_Bx1xQxK, logit_bias_BxHxQxK)
    weights_BxHxQxK = jax.nn.softmax(logits_BxHxQxK, axis=-1)
    return (self._mix(weights_BxHxQxK, v_BxKxGxE, deterministic),
            jax.nn.logsumexp(logits_BxHxQxK, axis=-1))

  def _logits(self, q_BxQxHxE, k_BxKxGxE, mask_Bx1xQxK, logit_bias_BxHxQxK):
    """Q K^T (/ sqrt(E)) + bias in float32, query head h reading key head h // (H / G), and a
    large negative where the mask forbids: [B, H, Q, K]."""
    batch, num_q, num_heads, head_dim = q_BxQxHxE.shape
    num_k, num_kv_heads = k_BxKxGxE.shape[1], k_BxKxGxE.shape[2]
    groups = num_heads // num_kv_heads
    if groups == 1:
      logits_BxHxQxK = precision.einsum('bqhe,bkhe->bhqk', q_BxQxHxE, k_BxKxGxE, self.dtype)
    else:  # query head h = g * groups + r reads key/value head g
      q_BxQxGxRxE = q_BxQxHxE.reshape(batch, num_q, num_kv_heads, groups, head_dim)
      logits_BxHxQxK = precision.einsum('bqgre,bkge->bgrqk', q_BxQxGxRxE, k_BxKxGxE,
                                        self.dtype).reshape(
          batch, num_heads, num_q, num_k)
    if self.scale_logits:
      logits_BxHxQxK = logits_BxHxQxK / jnp.sqrt(jnp.asarray(head_dim, jnp.float32))
    logits_BxHxQxK = logits_BxHxQxK.astype(jnp.float32)
    if logit_bias_BxHxQxK is not None:
      logits_BxHxQxK = logits_BxHxQxK + logit_bias_BxHxQxK
    if mask_Bx1xQxK is not None:
      # A large finite negative (not -inf): a fully masked row (padding query) stays finite.
      logits_BxHxQxK = jnp.where(mask_Bx1xQxK, logits_BxHxQxK, jnp.finfo(jnp.float32).min)
    return logits_BxHxQxK

  def _mix(self, weights_BxHxQxK, v_BxKxGxE, deterministic):
    """Attention dropout on the weights, then their sum of the values, query head h reading
    value head h // (H / G): [B, Q, H, E]."""
    batch, num_heads, num_q, num_k = weights_BxHxQxK.shape
    num_kv_heads, head_dim = v_BxKxGxE.shape[2:]
    groups = num_heads // num_kv_heads
    dropped_BxHxQxK = nn.Dropout(self.dropout_rate)(weights_BxHxQxK, deterministic=deterministic)
    if groups == 1:
      return precision.einsum('bhqk,bkhe->bqhe', dropped_BxHxQxK, v_BxKxGxE, self.dtype)
    dropped_BxGxRxQxK = dropped_BxHxQxK.reshape(batch, num_kv_heads, groups, num_q, num_k)
    return precision.einsum('bgrqk,bkge->bqgre', dropped_BxGxRxQxK, v_BxKxGxE,
                            self.dtype).reshape(batch, num_q, num_heads, head_dim)

  def _fixed_kv_cache(self, keys_values, cache_index):
    """fixed_kv's keys and values: keys_values() while the cache has none (the init call, which
    only sizes the cache, and the first call after it, which stores them), then the cache's.

    The cache holds them as [B, G, E, K] in the products' input dtype, the layout and dtype in
    which XLA:CPU's products of a decoding step's query read them; held in another layout, both
    were copied into it at every step (a sixth of a beam step's time). The optimization barrier
    keeps XLA from moving the transpose that stores them into the decoding loop, where it would
    run at every step again."""
    suffix = '' if cache_index is None else f'_{cache_index}'
    names = [name + suffix for name in FIXED_KV_CACHE]
    if self.is_initializing() or not self.has_variable('cache', names[0]):
      pair = tuple(x.astype(self.dtype) for x in keys_values())
      if not self.is_initializing():
        for name, x_BxKxGxE in zip(names, pair):
          x_BxGxExK = jax.lax.optimization_barrier(jnp.transpose(x_BxKxGxE, (0, 2, 3, 1)))
          self.put_variable('cache', name, x_BxGxExK)
      return pair
    return tuple(jnp.transpose(self.get_variable('cache', name), (0, 3, 1, 2)) for name in names)

  def _update_cache(self, k_BxQxHxE, v_BxQxHxE, cache_slot, cache_index):
    """Writes the new keys/values at slot `cache_slot` and returns the whole cache; with a ring
    buffer, writes them at the slots cache_slot [B, Q] (out of range: not kept) and returns the
    ring as it was before, followed by the new keys/values: [B, C + Q, H, E].

    cache_index names one cache per call of a layer shared by several depths (share_layers).
    """
    suffix = '' if cache_index is None else f'_{cache_index}'
    initialized = self.has_variable('cache', f'cached_key{suffix}')
    # Held in the products' input dtype: what attention reads of them at every step, without a
    # conversion of the whole cache each time, in half the memory under bfloat16.
    k_BxQxHxE, v_BxQxHxE = k_BxQxHxE.astype(self.dtype), v_BxQxHxE.astype(self.dtype)
    batch, length, heads, head_dim = k_BxQxHxE.shape
    # The linear cache is held head-major, [B, H, C, E]: the layout of attention's batched
    # products, which would otherwise copy the whole cache into it at every decoding step.
    shape = ((batch, heads, length, head_dim) if self.ring_cache_size is None
             else (batch, self.ring_cache_size, heads, head_dim))
    key_cache = self.variable('cache', f'cached_key{suffix}', jnp.zeros, shape, k_BxQxHxE.dtype)
    value_cache = self.variable('cache', f'cached_value{suffix}', jnp.zeros, shape,
                                v_BxQxHxE.dtype)
    if self.ring_cache_size:
      caches_and_new = ((key_cache, k_BxQxHxE), (value_cache, v_BxQxHxE))
      # The queries read the new keys too: a prefill longer than the ring still reads itself.
      read = tuple(jnp.concatenate([cache.value, new], axis=1) for cache, new in caches_and_new)
      if initialized:  # The init call only sizes the ring.
        rows_Bx1 = jnp.arange(batch)[:, None]
        for cache, new in caches_and_new:
          cache.value = cache.value.at[rows_Bx1, cache_slot].set(new, mode='drop')
      return read
    if not initialized:  # The init call only sizes the cache.
      return k_BxQxHxE, v_BxQxHxE
    start = (0, 0, cache_slot, 0)
    for cache, new_BxQxHxE in ((key_cache, k_BxQxHxE), (value_cache, v_BxQxHxE)):
      cache.value = jax.lax.dynamic_update_slice(cache.value, jnp.swapaxes(new_BxQxHxE, 1, 2),
                                                 start)
    return jnp.swapaxes(key_cache.value, 1, 2), jnp.swapaxes(value_cache.value, 1, 2)


class DecodeCursor(nn.Module):
  """Model-level decoding state: the next cache slot, which slots hold real tokens, and positions.

  Given the validity of Q new tokens, returns their first cache slot, their positions (pads
  between a prompt and its continuation do not advance positions), the [B, 1, Q, C]
  self-attention mask over the cache, for the 'causal' or 'prefix' mask kind (with local
  attention's window, or strided attention's pattern, over positions), and the positions of
  every cached key [B, C] (for position-dependent logit biases).

  Local attention's global tokens (num_global, Longformer's) are those at a row's first
  positions, pads skipped: they read, and are read by, every key the mask allows. Every query
  reads them, so they take the linear cache (ring_size None), not a ring of the window.

  With ring_size C (local attention) the cache is a ring buffer that keeps each row's last C
  real tokens, the one at position p in slot p mod C: memory O(C) whatever the decode length.
  Pads take no slot, so a padded prompt cannot push real tokens out of the ring. It then
  returns the slots [B, Q] to write the new tokens at (C: not kept), and the mask and key
  positions span the ring as it was followed by the new tokens ([B, 1, Q, C + Q], [B, C + Q]),
  as MultiHeadAttention reads them.
  """
  kind: str
  window: Optional[int] = None  # local attention: only keys fewer positions away than this
  ring_size: Optional[int] = None  # a ring-buffer cache of this many slots (None: linear)
  stride: Optional[int] = None  # strided attention: keys within or a multiple of this away
  num_global: int = 0  # local attention: tokens at positions below this read and are read by all

  @nn.compact
  def __call__(self, valid_BxQ: Array, prefix_len_B: Optional[Array] = None):
    if self.ring_size:
      return self._ring_buffer(valid_BxQ, prefix_len_B)
    batch, num_new = valid_BxQ.shape
    initialized = self.has_variable('cache', 'slot')
    slot = self.variable('cache', 'slot', lambda: jnp.zeros((), jnp.int32))
    # The init call sizes the cache with the full decode length.
    kv_valid = self.variable('cache', 'kv_valid', jnp.zeros, (batch, num_new), jnp.bool_)
    next_position = self.variable('cache', 'next_position', jnp.zeros, (batch,), jnp.int32)
    kv_positions = self.variable('cache', 'kv_positions', jnp.zeros, (batch, num_new), jnp.int32)

    first_slot = slot.value
    q_slots_Q = first_slot + jnp.arange(num_new)
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
                                                                self.window, self.num_global)
    strided = (None if self.stride is None
               else masks.strided_mask(positions_BxQ, kv_positions_BxC, self.stride))
    mask = masks.combine(masks.padding_mask(kv_valid_BxC), structure, local, strided)
    return first_slot, positions_BxQ, mask, kv_positions_BxC

  def _ring_buffer(self, valid_BxQ: Array, prefix_len_B: Optional[Array]):
    """__call__ with a ring-buffer cache (the class docstring)."""
    batch, num_new = valid_BxQ.shape
    size = self.ring_size
    initialized = self.has_variable('cache', 'next_position')
    next_position = self.variable('cache', 'next_position', jnp.zeros, (batch,), jnp.int32)
    # Per slot: whether it holds a real token, and that token's position.
    ring_valid = self.variable('cache', 'kv_valid', jnp.zeros, (batch, size), jnp.bool_)
    ring_positions = self.variable('cache', 'kv_positions', jnp.zeros, (batch, size), jnp.int32)

    valid_int = valid_BxQ.astype(jnp.int32)
    positions_BxQ = next_position.value[:, None] + jnp.cumsum(valid_int, axis=1) - valid_int
    end_B = next_position.value + valid_int.sum(axis=1)
    # A row's last `size` real tokens take distinct slots; those before them (in a prefill
    # longer than the ring) are read by this call's queries only.
    kept_BxQ = valid_BxQ & (positions_BxQ >= end_B[:, None] - size)
    slots_BxQ = jnp.where(kept_BxQ, positions_BxQ % size, size)
    kv_valid_BxK = jnp.concatenate([ring_valid.value, valid_BxQ], axis=1)
    kv_positions_BxK = jnp.concatenate([ring_positions.value, positions_BxQ], axis=1)

    # Positions, not slots, order the keys: slots wrap around.
    if self.kind == 'causal':
      structure = masks.causal_mask(positions_BxQ, kv_positions_BxK)
    elif self.kind == 'prefix':
      # prefix_len counts the tokens fed, pads included (as the linear cache's slots do). Only
      # the new keys need the flag: the ring's precede every new query, so causal shows them.
      tokens_fed = self.variable('cache', 'tokens_fed', lambda: jnp.zeros((), jnp.int32))
      in_prefix_BxQ = (tokens_fed.value + jnp.arange(num_new))[None, :] < prefix_len_B[:, None]
      in_prefix_BxK = jnp.concatenate([jnp.zeros_like(ring_valid.value), in_prefix_BxQ], axis=1)
      structure = masks.source_prefix_mask(in_prefix_BxK, positions_BxQ, kv_positions_BxK)
      if initialized:
        tokens_fed.value = tokens_fed.value + num_new
    else:
      raise ValueError(f'Cannot decode incrementally with mask kind {self.kind!r}')
    if initialized:  # The init call only sizes the ring.
      rows_Bx1 = jnp.arange(batch)[:, None]
      for ring, new_BxQ in ((ring_valid, valid_BxQ), (ring_positions, positions_BxQ)):
        ring.value = ring.value.at[rows_Bx1, slots_BxQ].set(new_BxQ, mode='drop')
      next_position.value = end_B
    local = masks.window_mask(positions_BxQ, kv_positions_BxK, self.window)
    mask = masks.combine(masks.padding_mask(kv_valid_BxK), structure, local)
    return slots_BxQ, positions_BxQ, mask, kv_positions_BxK
