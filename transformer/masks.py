"""Attention masks: the only place in the codebase where masks are built.

Every mask is boolean, True = "query may attend to key", with shape [batch, 1, q_len, kv_len] (the
1 broadcasts over heads); functions that do not depend on the batch return batch size 1. Combine
them with `combine`, which ANDs and skips Nones.

Masks are built from positions (indices along the sequence) rather than lengths so that the same
functions serve training (queries 0..L-1) and incremental decoding (one query at cache slot t).

  variant        self-attention mask
  original       encoder: padding;  decoder: causal & padding;  cross: source padding
  bert_mlm       padding                               (bidirectional)
  gpt_causal     causal & padding
  unilm_prefix   prefix_lm & padding                   (source bidirectional, target causal)
  packed rows    any of the above & segment            (no attention across packed examples)
"""

from typing import Optional

import jax.numpy as jnp

Array = jnp.ndarray


def padding_mask(kv_valid_BxK: Array) -> Array:
  """Keys that are real tokens. [B, K] bool -> [B, 1, 1, K]."""
  return kv_valid_BxK[:, None, None, :]


def causal_mask(q_idx_Q: Array, kv_idx_K: Array) -> Array:
  """Key index <= query index. q_idx [Q], kv_idx [K] (positions in the sequence) -> [1, 1, Q, K]."""
  return (kv_idx_K[None, :] <= q_idx_Q[:, None])[None, None]


def prefix_lm_mask(prefix_len_B: Array, q_idx_Q: Array, kv_idx_K: Array) -> Array:
  """UniLM's seq2seq mask: the first prefix_len positions see each other; the rest is causal.

  A key is visible if it is not in the future (causal) or it lies in the prefix. Source queries
  (q < prefix_len) can therefore never see a target key (k >= prefix_len > q).
  prefix_len [B] -> [B, 1, Q, K].
  """
  return source_prefix_mask(kv_idx_K[None, :] < prefix_len_B[:, None], q_idx_Q, kv_idx_K)


def source_prefix_mask(in_prefix_BxK: Array, q_idx_Q: Array, kv_idx_K: Array) -> Array:
  """The prefix-LM mask from a per-key flag: key visible if not in the future or in the prefix.

  With packed rows, in_prefix marks every example's own source; the segment mask then keeps each
  query inside its example. in_prefix [B, K] bool -> [B, 1, Q, K].
  """
  return causal_mask(q_idx_Q, kv_idx_K) | in_prefix_BxK[:, None, None, :]


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


def self_attention_mask(kind: str, valid_BxL: Array, *, prefix_len_B: Optional[Array] = None,
                        in_prefix_BxL: Optional[Array] = None,
                        segment_ids_BxL: Optional[Array] = None) -> Array:
  """The full self-attention mask of a training (non-incremental) pass over L tokens.

  kind: 'bidirectional' (encoders, bert_mlm), 'causal' (decoders, gpt_causal) or 'prefix'
  (unilm_prefix: needs prefix_len [B], or for packed rows in_prefix [B, L], the source tokens).
  valid [B, L] marks real (non-padding) tokens. -> broadcastable to [B, 1, L, L].
  """
  idx_L = jnp.arange(valid_BxL.shape[1])
  if kind == 'bidirectional':
    structure = None
  elif kind == 'causal':
    structure = causal_mask(idx_L, idx_L)
  elif kind == 'prefix':
    if prefix_len_B is not None:
      structure = prefix_lm_mask(prefix_len_B, idx_L, idx_L)
    elif in_prefix_BxL is not None:
      structure = source_prefix_mask(in_prefix_BxL, idx_L, idx_L)
    else:
      raise ValueError("mask kind 'prefix' needs prefix_len (or in_prefix for packed rows)")
  else:
    raise ValueError(f'Unknown mask kind {kind!r}; expected bidirectional, causal or prefix.')
  segments = (None if segment_ids_BxL is None
              else segment_mask(segment_ids_BxL, segment_ids_BxL))
  return combine(padding_mask(valid_BxL), structure, segments)


def cross_attention_mask(kv_valid_BxK: Array, q_segment_ids_BxQ: Optional[Array] = None,
                         kv_segment_ids_BxK: Optional[Array] = None) -> Array:
  """Decoder -> encoder mask: source padding, and same packed segment when packing. [B,1,Q|1,K]."""
  segments = (None if q_segment_ids_BxQ is None
              else segment_mask(q_segment_ids_BxQ, kv_segment_ids_BxK))
  return combine(padding_mask(kv_valid_BxK), segments)
