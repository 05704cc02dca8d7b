"""Attention kinds: which keys each query reads, computed at the kind's own cost.

  full    every key the mask allows (the paper's); logits take [B, H, L, L].
  local   a sliding window (Longformer's, the Sparse Transformer's local part): query i reads the
          keys j with |i - j| < attention_window that the mask allows (the causal mask leaves
          j in (i - w, i]). Computed a block at a time: queries in blocks of w = attention_window,
          each block against the keys of its own block and the one before it (causal) or the
          ones on either side (bidirectional), which hold every key within the window. Logits
          take [B, H, L, 2w or 3w]: memory grows as L * w, not as L^2.
  low_rank  Linformer: keys and values projected along the sequence to low_rank_dim rows by
          learned [low_rank_dim, max_len] matrices, so logits take [B, H, L, low_rank_dim].
          Every projected row mixes every position, so there is no causal or packed form:
          bidirectional stacks without packing only (bert_mlm), refused elsewhere.

A local pass uses the ordinary mask, evaluated on each block's query and key indices, and'ed
with the window (masks.local_self_attention_mask); position-dependent logit biases (T5's,
ALiBi) are computed on the same blocks. Cached decoding reads the cache under the window mask.
"""

import numpy as np

KINDS = ('full', 'local', 'low_rank')


def local_blocks(length: int, window: int, causal: bool) -> tuple[np.ndarray, np.ndarray]:
  """(query indices [N, W], key indices [N, K]) of the blocks of a local pass over `length`
  tokens: N = ceil(length / W) blocks of W = window queries; K = 2W keys (the block before and
  this one) if causal, else 3W (the blocks on either side too). Indices outside [0, length) mark
  keys (and queries) that do not exist: the mask hides them, the output drops them."""
  num_blocks = -(-length // window)
  starts_N = np.arange(num_blocks) * window
  q_idx_NxW = starts_N[:, None] + np.arange(window)[None, :]
  span = np.arange(-window, window if causal else 2 * window)
  return q_idx_NxW, starts_N[:, None] + span[None, :]


def gather_blocks(x_BxLx, idx_NxK: np.ndarray):
  """x[:, idx] with indices clipped into the sequence: [B, L, ...] -> [B, N, K, ...]."""
  return x_BxLx[:, np.clip(idx_NxK, 0, x_BxLx.shape[1] - 1)]


def fold(x_BxNx):
  """[B, N, ...] -> [B * N, ...]: the blocks of a row become rows of their own."""
  return x_BxNx.reshape(-1, *x_BxNx.shape[2:])


def unfold(x_BNxKx, batch: int):
  """[B * N, K, ...] -> [B, N * K, ...]: the blocks of each row back in order."""
  return x_BNxKx.reshape(batch, -1, *x_BNxKx.shape[2:])
