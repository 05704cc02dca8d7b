"""Truth tables of every mask on small hand-written inputs."""

import jax.numpy as jnp
import numpy as np
import pytest

from transformer import masks

T, F = True, False


def table(mask):  # [1, 1, Q, K] -> [Q, K] numpy
  assert mask.shape[1] == 1
  return np.asarray(mask[0, 0])


def test_padding():
  valid = jnp.array([[T, T, F]])
  assert masks.padding_mask(valid).shape == (1, 1, 1, 3)
  np.testing.assert_array_equal(table(masks.padding_mask(valid)), [[T, T, F]])


def test_causal():
  idx = jnp.arange(3)
  np.testing.assert_array_equal(table(masks.causal_mask(idx, idx)),
                                [[T, F, F],
                                 [T, T, F],
                                 [T, T, T]])


def test_causal_single_decode_query_over_cache():
  # Query at slot 2 of a 4-slot cache sees slots 0..2.
  np.testing.assert_array_equal(table(masks.causal_mask(jnp.array([2]), jnp.arange(4))),
                                [[T, T, T, F]])


def test_prefix_lm():
  idx = jnp.arange(5)
  m = masks.prefix_lm_mask(jnp.array([2]), idx, idx)
  # Positions 0,1 are the source: bidirectional among themselves, blind to the target (2..4).
  np.testing.assert_array_equal(table(m),
                                [[T, T, F, F, F],
                                 [T, T, F, F, F],
                                 [T, T, T, F, F],
                                 [T, T, T, T, F],
                                 [T, T, T, T, T]])


def test_prefix_lm_per_example_lengths():
  idx = jnp.arange(3)
  m = np.asarray(masks.prefix_lm_mask(jnp.array([0, 3]), idx, idx))
  np.testing.assert_array_equal(m[0, 0], np.tril(np.ones((3, 3), bool)))  # prefix 0 = causal
  np.testing.assert_array_equal(m[1, 0], np.ones((3, 3), bool))  # all prefix = bidirectional


def test_packed_prefix_lm_truth_table():
  # Two examples: source [a b] target [c], then source [d] target [e f]; then a pad.
  valid = jnp.array([[T, T, T, T, T, T, F]])
  in_prefix = jnp.array([[T, T, F, T, F, F, F]])
  segments = jnp.array([[1, 1, 1, 2, 2, 2, 0]])
  m = masks.self_attention_mask('prefix', valid, in_prefix_BxL=in_prefix, segment_ids_BxL=segments)
  np.testing.assert_array_equal(table(m), [[T, T, F, F, F, F, F],
                                           [T, T, F, F, F, F, F],
                                           [T, T, T, F, F, F, F],
                                           [F, F, F, T, F, F, F],
                                           [F, F, F, T, T, F, F],
                                           [F, F, F, T, T, T, F],
                                           [F, F, F, F, F, F, F]])


def test_segment():
  seg = jnp.array([[1, 1, 2, 0]])
  np.testing.assert_array_equal(table(masks.segment_mask(seg, seg)),
                                [[T, T, F, F],
                                 [T, T, F, F],
                                 [F, F, T, F],
                                 [F, F, F, T]])


def test_packed_causal_self_attention():
  # Two packed examples [a b | c] plus one pad: causal within each, nothing across, no pad keys.
  seg = jnp.array([[1, 1, 2, 0]])
  m = masks.self_attention_mask('causal', seg > 0, segment_ids_BxL=seg)
  np.testing.assert_array_equal(table(m),
                                [[T, F, F, F],
                                 [T, T, F, F],
                                 [F, F, T, F],
                                 [F, F, F, F]])


def test_bidirectional_with_padding():
  m = masks.self_attention_mask('bidirectional', jnp.array([[T, T, F]]))
  np.testing.assert_array_equal(np.broadcast_to(table(m), (3, 3)), [[T, T, F]] * 3)


def test_prefix_with_padding():
  m = masks.self_attention_mask('prefix', jnp.array([[T, T, T, F]]), prefix_len_B=jnp.array([2]))
  np.testing.assert_array_equal(table(m),
                                [[T, T, F, F],
                                 [T, T, F, F],
                                 [T, T, T, F],
                                 [T, T, T, F]])


def test_cross_attention_packed():
  dec_seg = jnp.array([[1, 2]])
  enc_seg = jnp.array([[1, 1, 2, 0]])
  m = masks.cross_attention_mask(enc_seg > 0, dec_seg, enc_seg)
  np.testing.assert_array_equal(table(m), [[T, T, F, F], [F, F, T, F]])


def test_combine_skips_none_and_ands():
  a = jnp.array([[[[T, F]]]])
  b = jnp.array([[[[T, T]]]])
  np.testing.assert_array_equal(masks.combine(None, a, b), a)
  assert masks.combine(None, None) is None


def test_unknown_kind_and_missing_prefix():
  with pytest.raises(ValueError, match='Unknown mask kind'):
    masks.self_attention_mask('sideways', jnp.ones((1, 2), bool))
  with pytest.raises(ValueError, match='prefix_len'):
    masks.self_attention_mask('prefix', jnp.ones((1, 2), bool))
