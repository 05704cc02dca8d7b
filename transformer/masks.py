"""Attention masks: the only place in the codebase where masks are built.

Every mask is boolean, True = "query may attend to key", with shape [batch, 1, q_len, kv_len] (the
1 broadcasts over heads); functions that do not depend on the batch return batch size 1. Combine
them with `combine`, which ANDs and skips Nones.

Masks are built from positions (indices along the sequence) rather than lengths so that the same
functions serve training (queries 0..L-1) and incremental decoding (one query at cache slot t, or
against the per-row positions of local attention's ring buffer, whose slots wrap around).

  variant        self-attention mask
  original       encoder: padding;  decoder: causal & padding;  cross: source padding
  bert_mlm       padding                               (bidirectional)
  gpt_causal     causal & padding
  unilm_prefix   prefix_lm & padding                   (source bidirectional, target causal)
  packed rows    any of the above & segment            (no attention across packed examples)
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from transformer import attention_kinds

Array = jnp.ndarray


def padding_mask(kv_valid_BxK: Array) -> Array:
  """Keys that are real tokens. [B, K] bool -> [B, 1, 1, K]."""
  return kv_valid_BxK[:, None, None, :]


def causal_mask(q_idx: Array, kv_idx: Array) -> Array:
  """Key index <= query index. q_idx [Q] or [B, Q], kv_idx [K] or [B, K] (positions in the
  sequence; per row for a ring-buffer cache, whose slots hold keys out of order)
  -> [1 or B, 1, Q, K]."""
  q_idx, kv_idx = jnp.atleast_2d(q_idx), jnp.atleast_2d(kv_idx)
  return (kv_idx[:, None, :] <= q_idx[:, :, None])[:, None]


def prefix_lm_mask(prefix_len_B: Array, q_idx_Q: Array, kv_idx_K: Array) -> Array:
  """UniLM's seq2seq mask: the first prefix_len positions see each other; the rest is causal.

  A key is visible if it is not in the future (causal) or it lies in the prefix. Source queries
  (q < prefix_len) can therefore never see a target key (k >= prefix_len > q).
  prefix_len [B] -> [B, 1, Q, K].
  """
  return source_prefix_mask(kv_idx_K[None, :] < prefix_len_B[:, None], q_idx_Q, kv_idx_K)


def source_prefix_mask(in_prefix_BxK: Array, q_idx: Array, kv_idx: Array) -> Array:
  """The prefix-LM mask from a per-key flag: key visible if not in the future or in the prefix.

  With packed rows, in_prefix marks every example's own source; the segment mask then keeps each
  query inside its example. in_prefix [B, K] bool, q_idx and kv_idx as in causal_mask
  -> [B, 1, Q, K].
  """
  return causal_mask(q_idx, kv_idx) | in_prefix_BxK[:, None, None, :]


def segment_mask(q_segment_ids_BxQ: Array, kv_segment_ids_BxK: Array) -> Array:
  """Block-diagonal mask of packed rows: attend only within the same segment id. -> [B, 1, Q, K]."""
  return (q_segment_ids_BxQ[:, :, None] == kv_segment_ids_BxK[:, None, :])[:, None]


def combine(*masks: Optional[Array]) -> Optional[Array]:
  """Logical AND of the given masks (broadcasting), ignoring Nones; None if all are None."""
  present = [m for m in masks if m is not None]
  if not present:
    return None
  out = present[0]
  for m in present[1:]:
    out = jnp.logical_and(out, m)
  return out


def window_mask(q_pos: Array, kv_pos: Array, window: int, num_global: int = 0) -> Array:
  """Keys fewer than `window` positions from the query: |q - k| < window (local attention), or,
  with num_global global tokens (Longformer's), a key or query at a position < num_global.
  q_pos [Q] or [B, Q], kv_pos [K] or [B, K] -> [1 or B, 1, Q, K]."""
  q_pos, kv_pos = jnp.atleast_2d(q_pos), jnp.atleast_2d(kv_pos)
  within = jnp.abs(q_pos[:, :, None] - kv_pos[:, None, :]) < window
  if num_global:
    within = within | (q_pos[:, :, None] < num_global) | (kv_pos[:, None, :] < num_global)
  return within[:, None]


def strided_mask(q_pos: Array, kv_pos: Array, stride: int) -> Array:
  """The Sparse Transformer's strided pattern (strided attention): keys fewer than `stride`
  positions from the query or a multiple of `stride` away, |q - k| < stride or
  (q - k) mod stride == 0. Shapes as window_mask."""
  q_pos, kv_pos = jnp.atleast_2d(q_pos), jnp.atleast_2d(kv_pos)
  offset = q_pos[:, :, None] - kv_pos[:, None, :]
  return ((jnp.abs(offset) < stride) | (offset % stride == 0))[:, None]


def self_attention_mask(kind: str, valid_BxL: Array, *, prefix_len_B: Optional[Array] = None,
                        in_prefix_BxL: Optional[Array] = None,
                        segment_ids_BxL: Optional[Array] = None,
                        q_idx_Q: Optional[Array] = None, kv_idx_K: Optional[Array] = None,
                        window: Optional[int] = None) -> Array:
  """The self-attention mask of a training (non-incremental) pass over L tokens.

  kind: 'bidirectional' (encoders, bert_mlm), 'causal' (decoders, gpt_causal) or 'prefix'
  (unilm_prefix: needs prefix_len [B], or for packed rows in_prefix [B, L], the source tokens).
  valid [B, L] marks real (non-padding) tokens. window: only keys fewer than `window` tokens
  away. q_idx [Q], kv_idx [K]: the indices of the queries and keys to compare (default: all L
  for both; local attention asks for one block at a time), an index outside [0, L) being a key
  that does not exist. -> broadcastable to [B, 1, Q, K].
  """
  length = valid_BxL.shape[1]
  if kv_idx_K is None:  # every query against every key
    q_idx_Q = kv_idx_K = jnp.arange(length)
    at = lambda x_BxL, idx: x_BxL
  else:  # the given indices only (both given)
    at = lambda x_BxL, idx: x_BxL[:, jnp.clip(idx, 0, length - 1)]
    exists_K = (kv_idx_K >= 0) & (kv_idx_K < length)
    valid_BxL = at(valid_BxL, kv_idx_K) & exists_K[None, :]
  if kind == 'bidirectional':
    structure = None
  elif kind == 'causal':
    structure = causal_mask(q_idx_Q, kv_idx_K)
  elif kind == 'prefix':
    if prefix_len_B is not None:
      structure = prefix_lm_mask(prefix_len_B, q_idx_Q, kv_idx_K)
    elif in_prefix_BxL is not None:
      structure = source_prefix_mask(at(in_prefix_BxL, kv_idx_K), q_idx_Q, kv_idx_K)
    else:
      raise ValueError("mask kind 'prefix' needs prefix_len (or in_prefix for packed rows)")
  else:
    raise ValueError(f'Unknown mask kind {kind!r}; expected bidirectional, causal or prefix.')
  segments = (None if segment_ids_BxL is None
              else segment_mask(at(segment_ids_BxL, q_idx_Q), at(segment_ids_BxL, kv_idx_K)))
  local = None if window is None else window_mask(q_idx_Q, kv_idx_K, window)
  return combine(padding_mask(valid_BxL), structure, segments, local)


def blocks_self_attention_mask(kind: str, valid_BxL: Array, q_idx_NxQ, kv_idx_NxK, pattern,
                               **parts) -> Array:
  """self_attention_mask and'ed with pattern(q_idx [Q], kv_idx [K]) -> [1, 1, Q, K], for each
  block of a blocked pass (attention_kinds.py) whose queries are q_idx and keys kv_idx:
  [B * N, 1, Q, K], row b * N + n for block n of row b. parts: prefix_len_B, in_prefix_BxL,
  segment_ids_BxL."""
  batch, (num_q, num_k) = valid_BxL.shape[0], (q_idx_NxQ.shape[1], kv_idx_NxK.shape[1])
  one_block = lambda q_idx_Q, kv_idx_K: jnp.broadcast_to(combine(
      self_attention_mask(kind, valid_BxL, q_idx_Q=q_idx_Q, kv_idx_K=kv_idx_K, **parts),
      pattern(q_idx_Q, kv_idx_K)), (batch, 1, num_q, num_k))
  return attention_kinds.fold(jax.vmap(one_block, out_axes=1)(q_idx_NxQ, kv_idx_NxK))


def local_self_attention_mask(kind: str, valid_BxL: Array, window: int, num_global: int = 0,
                              **parts):
  """self_attention_mask with the window, for each block of a local pass: [B * N, 1, W, K].
  With num_global global tokens, the masks of its two parts (attention_kinds.local_parts): the
  blocks' [B * N, 1, W, K + G], their last G keys the global ones outside the window (one inside
  it is read as a window key: counted once), and the G global queries' [B, 1, G, L], every key
  the mask allows. Packed rows have no global tokens (their examples start anywhere)."""
  if num_global and parts.get('segment_ids_BxL') is not None:
    raise ValueError('Global tokens (num_global_tokens) are the first of each row: packed rows '
                     'cannot have them.')
  blocks, *global_queries = attention_kinds.local_parts(valid_BxL.shape[1], window,
                                                         kind == 'causal', num_global)
  num_window_keys = attention_kinds.window_keys(window, kind == 'causal')

  def within(q_idx_Q, kv_idx_K):  # the window's keys, then the global keys outside it
    in_window = window_mask(q_idx_Q, kv_idx_K, window)
    return jnp.where(jnp.arange(kv_idx_K.shape[0]) < num_window_keys, in_window, ~in_window)

  block_mask = blocks_self_attention_mask(kind, valid_BxL, *blocks, within, **parts)
  if not global_queries:
    return block_mask
  every_key = lambda q_idx_Q, kv_idx_K: None
  return block_mask, blocks_self_attention_mask(kind, valid_BxL, *global_queries[0], every_key,
                                                **parts)


def strided_self_attention_mask(kind: str, valid_BxL: Array, stride: int,
                                **parts) -> tuple[Array, Array]:
  """The masks of a strided pass's two parts (attention_kinds.strided_parts): the local blocks'
  [B * N, 1, W, 2W or 3W], keys within the window, and the strided blocks' [B * S, 1, N, N],
  keys outside it (the blocks hold only keys a multiple of the stride away; the window's, the
  query itself among them, are the local part's)."""
  local, strided = attention_kinds.strided_parts(valid_BxL.shape[1], stride, kind == 'causal')
  within = lambda q_idx_Q, kv_idx_K: window_mask(q_idx_Q, kv_idx_K, stride)
  return (blocks_self_attention_mask(kind, valid_BxL, *local, within, **parts),
          blocks_self_attention_mask(kind, valid_BxL, *strided, lambda q, k: ~within(q, k),
                                     **parts))


class TokenMask(NamedTuple):
  """The self-attention mask as facts about each token, for attention that picks its query-key
  pairs as it runs (lsh): query i may read key j if valid[j], segment_ids[i] == segment_ids[j]
  and (j <= i or open[j]), i and j being indices in the row (token_pairs_mask)."""
  valid_BxL: Array  # real (non-padding) tokens
  open_BxL: Array  # keys every query of their example may read, earlier or not: all
  # (bidirectional), the source (prefix), none (causal)
  segment_ids_BxL: Array  # the example of each token of a packed row (all 0 without packing)


def token_mask(kind: str, valid_BxL: Array, *, prefix_len_B: Optional[Array] = None,
               in_prefix_BxL: Optional[Array] = None,
               segment_ids_BxL: Optional[Array] = None) -> TokenMask:
  """self_attention_mask's mask (the same arguments) as a TokenMask."""
  if kind == 'bidirectional':
    open_BxL = jnp.ones_like(valid_BxL)
  elif kind == 'causal':
    open_BxL = jnp.zeros_like(valid_BxL)
  elif kind == 'prefix' and prefix_len_B is not None:
    open_BxL = jnp.arange(valid_BxL.shape[1])[None, :] < prefix_len_B[:, None]
  elif kind == 'prefix' and in_prefix_BxL is not None:
    open_BxL = in_prefix_BxL
  else:
    raise ValueError(f'Unknown mask kind {kind!r} (expected bidirectional, causal or prefix), or '
                     "'prefix' without prefix_len or in_prefix.")
  segment_ids_BxL = (jnp.zeros(valid_BxL.shape, jnp.int32) if segment_ids_BxL is None
                     else segment_ids_BxL)
  return TokenMask(valid_BxL, open_BxL, segment_ids_BxL)


def token_pairs_mask(mask: TokenMask, q_idx: Array, kv_idx: Array) -> Array:
  """The mask between the tokens at row indices q_idx [B, ..., Q] and kv_idx [B, ..., K] (each
  in [0, L)) of every row -> [B, ..., Q, K]."""
  def at(x_BxL, idx):  # x[b, idx[b, ...]]
    return jnp.take_along_axis(x_BxL, idx.reshape(idx.shape[0], -1), axis=1).reshape(idx.shape)
  q_segment, kv_segment = at(mask.segment_ids_BxL, q_idx), at(mask.segment_ids_BxL, kv_idx)
  structure = ((kv_idx[..., None, :] <= q_idx[..., :, None])
               | at(mask.open_BxL, kv_idx)[..., None, :])
  return (at(mask.valid_BxL, kv_idx)[..., None, :] & structure
          & (q_segment[..., :, None] == kv_segment[..., None, :]))


def cross_attention_mask(kv_valid_BxK: Array, q_segment_ids_BxQ: Optional[Array] = None,
                         kv_segment_ids_BxK: Optional[Array] = None) -> Array:
  """Decoder -> encoder mask: source padding, and same packed segment when packing. [B,1,Q|1,K]."""
  segments = (None if q_segment_ids_BxQ is None
              else segment_mask(q_segment_ids_BxQ, kv_segment_ids_BxK))
  return combine(padding_mask(kv_valid_BxK), segments)
