"""Local attention with Longformer's global tokens, strided (Sparse Transformer) and LSH
(Reformer) attention, against their written-out definitions in NumPy (never the code's own masks or
helpers, except the random draw of LSH's rotations), and the model properties they must keep: no
future leakage, lsh refusing a decoding cache. Local, strided and global cached decoding against
the full forward: tests/test_blocks.py.

  local    query i reads key j if |i - j| < w, and the mask allows
  global   ... or if i < g or j < g
  strided  query i reads key j if |i - j| < l or (i - j) mod l == 0, and the mask allows
  lsh      keys = queries / |queries|; h(k) = argmax([kR; -kR]); tokens sorted by (bucket,
           position), padding last; a query reads the keys of its bucket fewer than m sorted
           places away, itself at -1e5; round r weighted by exp(z_r - logsumexp_r z_r)
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import bert_mlm, gpt_causal, unilm_prefix
from tests.test_blocks import VOCAB, attention_oracle, randomize, softmax
from transformer import (attention_kinds, config_checks, decode, errors, masks, models, perf,
                         variants)
from transformer.attention import MultiHeadAttention


def random_params(module, *args, **kwargs):
  """randomize(init), compiled once: tests here compile whole programs rather than op by op."""
  return jax.jit(lambda *args: randomize(nn.unbox(module.init(jax.random.key(0), *args,
                                                              **kwargs)['params'])))(*args)


def apply(module, params, *args, **kwargs):
  return jax.jit(lambda params, *args: module.apply({'params': params}, *args, **kwargs))(
      params, *args)


def strided_pattern(length, stride):
  i, j = np.arange(length)[:, None], np.arange(length)[None, :]
  return (np.abs(i - j) < stride) | ((i - j) % stride == 0)


def mask_kind(causal):
  return 'causal' if causal else 'bidirectional'


@pytest.mark.parametrize('variant', ['gpt_causal', 'unilm_packed'])
def test_strided_model_equals_full_attention_under_the_strided_mask(variant, monkeypatch):
  """A strided model equals the same model with full attention whose mask also holds the
  pattern: the causal or prefix mask, padding, packed segments and logit biases (T5's, ALiBi)
  evaluated on each part's blocks agree. (The strided side cannot ignore the pattern along
  with the full side: the test above holds it to the pattern.)"""
  length = 14
  ids = jax.random.randint(jax.random.key(0), (2, length), 4, VOCAB).at[1, 11:].set(0)
  if variant == 'gpt_causal':
    config, kwargs = gpt_causal.get_config('tiny'), {}
    config.positional = 'relative_bias'
  else:  # two examples per row, each with its own source (token type 0)
    config = unilm_prefix.get_config('tiny')
    config.positional = 'alibi'
    kwargs = dict(segment_ids=jnp.asarray([[1] * 7 + [2] * 7] * 2),
                  token_types=jnp.asarray([[0] * 3 + [1] * 4 + [0] * 4 + [1] * 3] * 2))
  config.update(attention_kind='strided', attention_window=3, num_layers=1)
  model = variants.build_model(config, VOCAB)
  params = random_params(model, ids, **kwargs)
  strided = apply(model, params, ids, **kwargs)
  config.attention_kind = 'full'
  full_model = variants.build_model(config, VOCAB)
  pattern_1x1xLxL = jnp.asarray(strided_pattern(length, 3))[None, None]
  monkeypatch.setattr(models, 'self_attention_mask', lambda cfg, kind, valid, **parts:
                      masks.self_attention_mask(kind, valid, **parts) & pattern_1x1xLxL)
  np.testing.assert_allclose(strided, apply(full_model, params, ids, **kwargs), rtol=1e-5,
                             atol=1e-5)


def global_pattern(length, window, num_global):
  """Longformer's local + global pattern: within the window, or a global query or key."""
  i, j = np.arange(length)[:, None], np.arange(length)[None, :]
  return (np.abs(i - j) < window) | (i < num_global) | (j < num_global)


@pytest.mark.parametrize('kind, num_global', [('strided', 0), ('local', 0), ('local', 2),
                                              ('local', 5)],
                         ids=['strided', 'local', 'globals_inside_a_block',
                              'globals_over_two_blocks'])
@pytest.mark.parametrize('causal', [True, False], ids=['causal', 'bidirectional'])
def test_blocked_kinds_match_their_definition(kind, causal, num_global):
  """Strided attention (two blocked parts) and local attention (blocks; with global tokens, each
  block's keys plus the globals and the global queries in a block of their own) equal attention
  under their written-out patterns (and j <= i if causal, and padding) on a length that is not a
  multiple of the window, with grouped key/value heads: global keys within a query's window and
  outside it, the 5 globals over two blocks."""
  rng = np.random.default_rng(0)
  length, window = 11, 3
  x = rng.normal(size=(2, length, 16)).astype(np.float32)
  valid = np.ones((2, length), bool)
  valid[1, 8:] = False
  i, j = np.arange(length)[:, None], np.arange(length)[None, :]
  pattern = (strided_pattern(length, window) if kind == 'strided'
             else global_pattern(length, window, num_global))
  mask = pattern & ((j <= i) if causal else True) & valid[:, None, :]
  if kind == 'strided':
    layer = MultiHeadAttention(num_heads=4, num_kv_heads=2, stride=window, causal=causal)
    part_masks = masks.strided_self_attention_mask(mask_kind(causal), jnp.asarray(valid), window)
  else:
    layer = MultiHeadAttention(num_heads=4, num_kv_heads=2, attention_window=window,
                               causal=causal, num_global_tokens=num_global)
    part_masks = masks.local_self_attention_mask(mask_kind(causal), jnp.asarray(valid), window,
                                                 num_global)
  params = random_params(layer, x, x, part_masks, deterministic=True)
  out = apply(layer, params, x, x, part_masks, deterministic=True)
  w = {k: np.asarray(params[k]['kernel']) for k in ('query', 'key', 'value', 'out')}
  seen = mask.any(-1)  # queries with a key to read (the oracle has no answer for the others)
  np.testing.assert_allclose(np.asarray(out)[seen], attention_oracle(x, w, 4, 2, mask)[seen],
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('variant', ['bert_mlm', 'gpt_causal', 'unilm_prefix'])
def test_local_global_model_equals_full_attention_under_its_pattern(variant, monkeypatch):
  """A local model with global tokens equals the same model with full attention whose mask also
  holds the local + global pattern: the bidirectional, causal or prefix mask, padding and logit
  biases (ALiBi, T5's) evaluated on the blocks with their global keys and on the global
  queries' block agree. Without the globals in its mask, the full model differs."""
  length, window, num_global = 14, 3, 2
  ids = jax.random.randint(jax.random.key(0), (2, length), 4, VOCAB).at[1, 11:].set(0)
  config_module, kwargs = {
      'bert_mlm': (bert_mlm, {}), 'gpt_causal': (gpt_causal, {}),
      'unilm_prefix': (unilm_prefix, dict(prefix_len=jnp.asarray([5, 9])))}[variant]
  config = config_module.get_config('tiny')
  config.update(attention_kind='local', attention_window=window, num_global_tokens=num_global,
                positional='alibi' if variant == 'bert_mlm' else 'relative_bias')
  model = variants.build_model(config, VOCAB)
  params = random_params(model, ids, **kwargs)
  local = apply(model, params, ids, **kwargs)
  config.attention_kind = 'full'
  full_model = variants.build_model(config, VOCAB)

  def full_under(pattern_LxL):
    monkeypatch.setattr(models, 'self_attention_mask', lambda cfg, kind, valid, **parts:
                        masks.self_attention_mask(kind, valid, **parts)
                        & jnp.asarray(pattern_LxL)[None, None])
    return apply(full_model, params, ids, **kwargs)

  np.testing.assert_allclose(local, full_under(global_pattern(length, window, num_global)),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(local, full_under(global_pattern(length, window, 0)), atol=1e-3)


@pytest.mark.parametrize('overrides, expected', [
    (dict(num_global_tokens=-1), 'config.num_global_tokens=-1 must be 0 (none) or positive.'),
    (dict(attention_kind='strided', num_global_tokens=2),
     "config.num_global_tokens=2 (Longformer's global tokens) needs config.attention_kind=local, "
     'not strided.'),
    (dict(attention_kind='local', num_global_tokens=2, packing=True),
     'config.num_global_tokens=2 needs config.packing=False: the global tokens are the first of '
     'each row'),
], ids=['negative', 'strided', 'packed'])
def test_global_token_config_mistakes_are_named(overrides, expected):
  config = unilm_prefix.get_config('tiny')
  config.update(attention_kind='local', num_global_tokens=2)
  config_checks.check(config)  # local attention with global tokens, unpacked: fine
  config.update(overrides)
  with pytest.raises(errors.ConfigError, match=re.escape(expected)):
    config_checks.check(config)


def logsumexp(x):
  return np.log(np.exp(x - x.max()).sum()) + x.max()


def lsh_oracle(x, w, num_heads, num_kv_heads, rotations_RxHxExF, chunk, causal, valid):
  """Reformer's LSH attention as the module docstring states it, one query at a time (padding
  queries, which read nothing, are left at 0)."""
  batch, length, d = x.shape
  e = d // num_heads
  q = (x @ w['query']).reshape(batch, length, num_heads, e)
  k = q / np.sqrt((q ** 2).sum(-1, keepdims=True) + 1e-6)
  v = (x @ w['value']).reshape(batch, length, num_kv_heads, e)
  num_buckets = 2 * rotations_RxHxExF.shape[-1]
  out = np.zeros_like(q)
  for b in range(batch):
    for h in range(num_heads):
      round_outs, round_lses = [], []
      for rotation_ExF in rotations_RxHxExF[:, h]:
        rotated = k[b, :, h] @ rotation_ExF
        bucket = np.argmax(np.concatenate([rotated, -rotated], -1), -1)
        bucket = np.where(valid[b], bucket, num_buckets)  # padding after every bucket
        place = np.empty(length, int)
        place[np.lexsort((np.arange(length), bucket))] = np.arange(length)
        o, z = np.zeros((length, e)), np.zeros(length)
        for i in np.flatnonzero(valid[b]):
          keys = [j for j in range(length) if bucket[j] == bucket[i] and valid[b, j]
                  and abs(place[i] - place[j]) < chunk and (j <= i or not causal)]
          logits = np.array([q[b, i, h] @ k[b, j, h] / np.sqrt(e) - 1e5 * (i == j) for j in keys])
          o[i] = softmax(logits) @ v[b, keys, h // (num_heads // num_kv_heads)]
          z[i] = logsumexp(logits)
        round_outs.append(o)
        round_lses.append(z)
      weights_LxR = softmax(np.stack(round_lses, -1))
      out[b, :, h] = np.einsum('lr,rle->le', weights_LxR, np.stack(round_outs))
  return out.reshape(batch, length, d) @ w['out']


def lsh_layer_and_output(x, valid, causal, num_buckets, rounds, chunk):
  """(out, params) of a 2-head LSH layer with one value head, in a deterministic call."""
  layer = MultiHeadAttention(num_heads=2, num_kv_heads=1, lsh_buckets=num_buckets,
                             lsh_rounds=rounds, lsh_chunk=chunk, causal=causal)
  mask = masks.token_mask(mask_kind(causal), jnp.asarray(valid))
  params = random_params(layer, x, x, mask, deterministic=True)
  assert set(params) == {'query', 'value', 'out'}  # shared-QK: no key projection
  return apply(layer, params, x, x, mask, deterministic=True), params


def eval_rotations(rounds, num_heads, head_dim, num_buckets):
  """The rotations of a deterministic call (attention_kinds.LSH_EVAL_SEED)."""
  return np.asarray(attention_kinds.lsh_rotations(
      jax.random.key(attention_kinds.LSH_EVAL_SEED), rounds, num_heads, head_dim, num_buckets))


@pytest.mark.parametrize('causal', [True, False], ids=['causal', 'bidirectional'])
def test_lsh_attention_matches_reformer_written_out(causal):
  """Three rounds of 4 buckets over 13 tokens in chunks of 2: the hash, the sort by (bucket,
  position), the window in the sorted order, the self penalty, the causal and padding masks and
  the rounds' logsumexp weighting all as written out in NumPy."""
  rng = np.random.default_rng(0)
  length = 13
  x = rng.normal(size=(2, length, 16)).astype(np.float32)
  valid = np.ones((2, length), bool)
  valid[1, 10:] = False
  out, params = lsh_layer_and_output(x, valid, causal, num_buckets=4, rounds=3, chunk=2)
  w = {k: np.asarray(params[k]['kernel']) for k in ('query', 'value', 'out')}
  expected = lsh_oracle(x, w, 2, 1, eval_rotations(3, 2, 8, 4), 2, causal, valid)
  np.testing.assert_allclose(np.asarray(out)[valid], expected[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('causal', [True, False], ids=['causal', 'bidirectional'])
def test_lsh_with_one_chunk_is_shared_qk_attention_within_each_bucket(causal):
  """A chunk as long as the sequence puts every key of the query's bucket in reach: one round of
  2 buckets is then full shared-QK attention among the tokens whose keys lie on the same side
  of the rotation's hyperplane (k R >= 0 or < 0), a query reading itself only when no other key
  is allowed."""
  rng = np.random.default_rng(1)
  length, num_heads, head_dim = 9, 2, 8
  x = rng.normal(size=(2, length, 16)).astype(np.float32)
  valid = np.ones((2, length), bool)
  valid[0, 7:] = False
  out, params = lsh_layer_and_output(x, valid, causal, num_buckets=2, rounds=1, chunk=length)
  w = {k: np.asarray(params[k]['kernel']) for k in ('query', 'value', 'out')}
  q = (x @ w['query']).reshape(2, length, num_heads, head_dim)
  k = q / np.linalg.norm(q, axis=-1, keepdims=True)
  v = (x @ w['value']).reshape(2, length, 1, head_dim)
  rotation_HxE = eval_rotations(1, num_heads, head_dim, 2)[0, :, :, 0]
  side_BxLxH = np.einsum('blhe,he->blh', k, rotation_HxE) < 0
  heads = []
  for h in range(num_heads):
    allowed = ((side_BxLxH[:, :, None, h] == side_BxLxH[:, None, :, h]) & valid[:, None, :]
               & (np.tril(np.ones((length, length), bool)) if causal else True))
    others = allowed & ~np.eye(length, dtype=bool)
    allowed = np.where(others.any(-1, keepdims=True), others, allowed)
    logits = np.einsum('bqe,bke->bqk', q[:, :, h], k[:, :, h]) / np.sqrt(head_dim)
    heads.append(softmax(np.where(allowed, logits, -np.inf)) @ v[:, :, 0])
  expected = np.concatenate(heads, -1) @ w['out']
  assert len(np.unique(side_BxLxH)) == 2  # both buckets are used
  np.testing.assert_allclose(np.asarray(out)[valid], expected[valid], rtol=1e-5, atol=1e-5)


def test_causal_lsh_has_no_future_leakage_and_no_cache():
  """Changing tokens from t on changes no logit before t, although their hashes move every
  later token's place in the sorted order; cached decoding is refused by name, and decode.py
  decodes by recomputing the prefix instead."""
  config = gpt_causal.get_config('tiny')
  config.update(attention_kind='lsh', attention_window=2, lsh_buckets=4, lsh_rounds=2,
                positional='rotary', num_layers=1)
  model = variants.build_model(config, VOCAB)
  x = jax.random.randint(jax.random.key(0), (2, 9), 4, VOCAB)
  params = random_params(model, x)
  forward = jax.jit(lambda x: model.apply({'params': params}, x))
  full, changed = forward(x), forward(x.at[:, 5:].set(3))
  np.testing.assert_allclose(full[:, :5], changed[:, :5], atol=1e-6)
  assert not np.allclose(full[:, 5:], changed[:, 5:])
  with pytest.raises(ValueError, match='config.attention_kind=lsh has no cached decoding'):
    decode.init_cache(model, 2, 9)
  assert decode.generate(model, params, x[:, :4], max_len=2).shape == (2, 2)


def test_keys_per_query_of_each_kind():
  config = gpt_causal.get_config('tiny')
  config.update(attention_window=16, lsh_rounds=3)
  expected = {'full': 1000, 'local': 32, 'strided': 32 + 63, 'lsh': 3 * 32}
  for kind, keys in expected.items():
    config.attention_kind = kind
    assert perf.keys_per_query(config, 1000, causal=True) == keys, kind
  config.update(attention_kind='local', num_global_tokens=4)  # 4 keys more, and 4 queries of all
  assert perf.keys_per_query(config, 1000, causal=True) == 32 + 2 * 4
