"""Attention kinds: which keys each query reads, computed at the kind's own cost.

  full    every key the mask allows (the paper's); logits take [B, H, L, L].
  local   a sliding window (Longformer's, the Sparse Transformer's local part): query i reads the
          keys j with |i - j| < attention_window that the mask allows (the causal mask leaves
          j in (i - w, i]). Computed a block at a time: queries in blocks of w = attention_window,
          each block against the keys of its own block and the one before it (causal) or the
          ones on either side (bidirectional), which hold every key within the window. Logits
          take [B, H, L, 2w or 3w]: memory grows as L * w, not as L^2.
          num_global_tokens = g > 0 adds Longformer's global attention (Beltagy et al. 2020,
          section 3.1), symmetric: the first g tokens of a row are global, and query i reads key j
          if the mask allows and |i - j| < w, or j < g, or i < g (a causal global query still
          reads no later key). Every block's keys end with the g global keys (a global key
          within a query's window is read among the window's keys and masked among the global
          ones: counted once), and the g global queries read every key in a block of their own,
          whose rows replace theirs in the blocks' output. Logits take [B, H, L, 2w + g or
          3w + g] and [B, H, g, L]: memory grows as L * (w + g). The globals are the first g
          indices of a row (in cached decoding the first g positions, pads skipped), so packed
          rows, whose examples start anywhere, are refused (config_checks).
  strided the Sparse Transformer's strided pattern (Child et al. 2019, section 4.2), its stride
          l being attention_window: query i reads the keys j with |i - j| < l (the local part,
          as `local`) or (i - j) mod l == 0 (the strided part) that the mask allows. The two
          patterns are merged into one that every head reads (the paper's "merged" alternative),
          not split over alternate heads: one mask and one blocked computation for all heads,
          no constraint on the head count, and every key within two layers' reach. Computed in
          two blocked parts: local's blocks, and strided blocks, block r < l holding the tokens
          r, r + l, r + 2l, ... as queries and as keys, each reading the others outside the
          window (j == i, the one key in both sets, is counted once: in the local part). One
          softmax over the union: each part's output o_p and logsumexp z_p combine as
          sum_p exp(z_p - z) o_p (z: the logsumexp of the z_p). Logits take [B, H, L, 2l or 3l]
          and [B, H, L, L / l]: memory grows as L * (l + L / l), not as L^2.
  low_rank  Linformer: keys and values projected along the sequence to low_rank_dim rows by
          learned [low_rank_dim, max_len] matrices, so logits take [B, H, L, low_rank_dim].
          Every projected row mixes every position, so there is no causal or packed form:
          bidirectional stacks without packing only (bert_mlm), refused elsewhere.
  lsh     Reformer's LSH attention (Kitaev et al. 2020, section 2). Shared-QK: no key
          projection, a token's key is its query unit-normalised. Each of lsh_rounds rounds
          hashes, per head, every key to h(k) = argmax([kR; -kR]), R a random [E, lsh_buckets / 2]
          rotation, and sorts the tokens by (bucket, position), padding after every bucket. A
          query reads, under the ordinary mask, the keys of its own bucket (the paper's P_i:
          others in reach are masked, its appendix's m(j, P_i) = inf) fewer than
          m = attention_window places from it in that order (its m - 1 nearest earlier ones in the
          bucket, when causal), itself only if nothing else is left (its logit takes -1e5, the
          paper's m(i, i)). Rounds combine as the strided parts do, sum_r exp(z_r - z) o_r (the
          paper's weighting; a key found in several rounds counts in each: the appendix's
          log N_ij correction is not applied). Computed as local attention over the sorted order:
          chunks of m sorted tokens read their own chunk and the one before it (and the one
          after, bidirectional), so logits take [B, rounds, H, L, 2m or 3m].
          Why a window in the sorted order rather than the paper's fixed chunks (eq. 4, chunk
          floor(s / m) and the one before): where a fixed chunk starts depends on how many tokens,
          later ones included, hash to lower buckets, so a causal query's keys would depend on the
          future. The keys within m places in its own bucket depend only on the tokens between
          them (same bucket, positions in between): causal use is leak-free, and neither padding
          nor another packed example takes a place in a query's window.
          R is drawn at every call: from the 'dropout' rng when not deterministic (training:
          fresh rotations every step and layer), else from the fixed key LSH_EVAL_SEED
          (evaluation: the same hashing every call, the same R in every layer). There is no
          cached decoding (the buckets and their order are the whole sequence's):
          MultiHeadAttention refuses decode=True, and decode.py recomputes the prefix instead.

A local pass uses the ordinary mask, evaluated on each block's query and key indices, and'ed
with the window (masks.local_self_attention_mask); position-dependent logit biases (T5's,
ALiBi) are computed on the same blocks. Cached decoding keeps a ring buffer of each row's last
w keys and values (attention.DecodeCursor), so its memory is O(w) whatever the decode length:
each call's queries read the ring followed by their own new keys, under the window mask over
positions, and the last w of those keys (pads skipped) then overwrite the oldest slots. With
global tokens, every query reads the first g, so decoding keeps a cache as long as the decode
instead (layers.ring_cache_size), read under the window mask or'ed with the global pairs over
positions (masks.window_mask).
A strided pass does the same for each of its two parts (masks.strided_self_attention_mask);
cached decoding reads a full-length cache under the strided mask (masks.strided_mask). An lsh
pass evaluates the mask on the pairs it picks, from per-token facts (masks.TokenMask); logit
biases are refused for it (config_checks).
"""

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ('full', 'local', 'strided', 'low_rank', 'lsh')
LSH_EVAL_SEED = 0  # lsh: the key of the rotations of deterministic calls
LSH_SELF_PENALTY = 1e5  # lsh: subtracted from a query's logit for itself (the paper's m(i, i))


def local_blocks(length: int, window: int, causal: bool) -> tuple[np.ndarray, np.ndarray]:
  """(query indices [N, W], key indices [N, K]) of the blocks of a local pass over `length`
  tokens: N = ceil(length / W) blocks of W = window queries; K = 2W keys (the block before and
  this one) if causal, else 3W (the blocks on either side too). Indices outside [0, length) mark
  keys (and queries) that do not exist: the mask hides them, the output drops them."""
  num_blocks = -(-length // window)
  starts_N = np.arange(num_blocks) * window
  q_idx_NxW = starts_N[:, None] + np.arange(window)[None, :]
  span = np.arange(-window, window_keys(window, causal) - window)
  return q_idx_NxW, starts_N[:, None] + span[None, :]


def window_keys(window: int, causal: bool) -> int:
  """The keys of a local block: 2W (the block before and its own) if causal, else 3W."""
  return (2 if causal else 3) * window


def local_parts(length: int, window: int, causal: bool,
                num_global: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
  """The (query indices, key indices) of each part of a local pass: its blocks (local_blocks);
  with num_global global tokens (the first g = min(num_global, length) of the row), the same
  blocks with the g global keys after their own ([N, W], [N, K + g]), and one block of the g
  global queries reading every key ([1, g], [1, length]), whose rows replace theirs."""
  q_idx_NxW, kv_idx_NxK = local_blocks(length, window, causal)
  num_global = min(num_global, length)
  if not num_global:
    return [(q_idx_NxW, kv_idx_NxK)]
  global_idx = np.arange(num_global)
  with_globals_NxK = np.concatenate(
      [kv_idx_NxK, np.broadcast_to(global_idx, (len(kv_idx_NxK), num_global))], axis=1)
  return [(q_idx_NxW, with_globals_NxK), (global_idx[None, :], np.arange(length)[None, :])]


def gather_blocks(x_BxLx, idx_NxK: np.ndarray):
  """x[:, idx] with indices clipped into the sequence: [B, L, ...] -> [B, N, K, ...]."""
  return x_BxLx[:, np.clip(idx_NxK, 0, x_BxLx.shape[1] - 1)]


def fold(x_BxNx):
  """[B, N, ...] -> [B * N, ...]: the blocks of a row become rows of their own."""
  return x_BxNx.reshape(-1, *x_BxNx.shape[2:])


def qkv_blocks(q_BxLxHxE, k_BxLxGxE, v_BxLxGxE, q_idx_NxW: np.ndarray, kv_idx_NxK: np.ndarray):
  """The queries [B * N, W, H, E], keys and values [B * N, K, G, E] of a blocked pass's blocks."""
  return tuple(fold(gather_blocks(x, idx)) for x, idx in (
      (q_BxLxHxE, q_idx_NxW), (k_BxLxGxE, kv_idx_NxK), (v_BxLxGxE, kv_idx_NxK)))


def unfold(x_BNxKx, batch: int):
  """[B * N, K, ...] -> [B, N * K, ...]: the blocks of each row back in order."""
  return x_BNxKx.reshape(batch, -1, *x_BNxKx.shape[2:])


def strided_blocks(length: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
  """(query indices [S, N], key indices [S, N]) of the strided part of a strided pass: block
  r < S = stride holds the tokens r, r + S, r + 2S, ... (N = ceil(length / S) of them) as
  queries and as keys. Indices >= length mark tokens that do not exist."""
  idx_SxN = np.arange(stride)[:, None] + stride * np.arange(-(-length // stride))[None, :]
  return idx_SxN, idx_SxN


def strided_parts(length: int, stride: int, causal: bool) -> tuple[tuple, tuple]:
  """The (query indices, key indices) of a strided pass's two parts: the local blocks
  (local_blocks, window = stride) and the strided blocks (strided_blocks)."""
  return local_blocks(length, stride, causal), strided_blocks(length, stride)


def in_query_order(x_BNxQx, q_idx_NxQ: np.ndarray, batch: int, length: int):
  """Blocked rows [B * N, Q, ...] whose queries are q_idx (each query in one block) ->
  [B, length, ...] in query order, the queries that do not exist dropped."""
  return unfold(x_BNxQx, batch)[:, np.argsort(q_idx_NxQ.ravel())[:length]]


def combine_by_logsumexp(out_PxBxLxHxE, lse_PxBxLxH):
  """One softmax over P key sets from each set's own: sum_p exp(z_p - z) o_p, o_p [B, L, H, E]
  the attention output over set p, z_p [B, L, H] the logsumexp of its logits, z that of the z_p.
  For disjoint sets this is exactly the softmax over their union."""
  weights_PxBxLxH = jax.nn.softmax(lse_PxBxLxH, axis=0)
  return jnp.sum(weights_PxBxLxH[..., None] * out_PxBxLxHxE, axis=0).astype(out_PxBxLxHxE.dtype)


def lsh_rotations(key, rounds: int, heads: int, head_dim: int, num_buckets: int):
  """Reformer's random rotations, independent for every round and head: [R, H, E, F] standard
  normal entries, F = num_buckets / 2."""
  return jax.random.normal(key, (rounds, heads, head_dim, num_buckets // 2), jnp.float32)


def lsh_buckets(keys_BxLxHxE, rotations_RxHxExF):
  """Reformer's hash h(k) = argmax([kR; -kR]) of every key, per round and head: [B, R, H, L]
  buckets in [0, 2F)."""
  rotated_BxRxHxLxF = jnp.einsum('blhe,rhef->brhlf', keys_BxLxHxE.astype(jnp.float32),
                                 rotations_RxHxExF)
  return jnp.argmax(jnp.concatenate([rotated_BxRxHxLxF, -rotated_BxRxHxLxF], axis=-1), axis=-1)


def lsh_order(buckets_BxRxHxL, valid_BxL, num_buckets: int):
  """The token indices [B, R, H, L] sorted by (bucket, position), padding after every bucket
  (so that it takes no place in a real token's window)."""
  length = valid_BxL.shape[1]
  buckets_BxRxHxL = jnp.where(valid_BxL[:, None, None, :], buckets_BxRxHxL, num_buckets)
  return jnp.argsort(buckets_BxRxHxL * length + jnp.arange(length)[None, None, None, :], axis=-1)
