"""The block's switches and the positional schemes against their written-out definitions (NumPy
here, never the code's own helpers), and the model properties every combination must keep: no
future leakage, cached decoding equal to the full forward, exact parameter counts.

  norm=rmsnorm        x / sqrt(mean(x^2) + eps) * g
  ffn=gated           (act(x W_gate) * x W_i) W_o
  num_kv_heads        query head h reads key/value head h // (H / H_kv)
  qk_norm             each head's q and k normalised over its E features
  positional=rotary   (x_i, x_{i+E/2}) rotated by pos * theta^(-2i/E)
  relative_bias       T5's buckets, checked against a hand-computed table
  alibi               -slope_h * |q - k|
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import gpt_causal, original, unilm_prefix
from configs.sweeps import modern_block_gpt, modern_block_original
from transformer import decode, masks, models, objectives, positions, variants
from transformer.attention import MultiHeadAttention
from transformer.layers import FeedForward, ModelConfig

VOCAB = 40


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def unbox_init(module, *args, **kwargs):
  return nn.unbox(module.init(jax.random.key(0), *args, **kwargs)['params'])


def randomize(params, seed=1):
  """Every parameter random (norm scales included), so a dropped or swapped one shows."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) * 0.5 + (x.ndim == 1)
                                   for k, x in zip(keys, leaves)])


# --- Norms and feed-forward ----------------------------------------------------------------------

def test_rmsnorm_and_gated_feed_forward_match_their_definitions():
  x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype(np.float32) + 0.7  # nonzero mean
  cfg = ModelConfig(vocab_size=VOCAB, d_model=8, d_ff=12, ffn='gated', activation='silu',
                    ffn_bias=False, norm='rmsnorm', norm_epsilon=0.1)
  ffn = FeedForward(cfg)
  params = randomize(unbox_init(ffn, x))
  out = ffn.apply({'params': params}, x)
  silu = lambda z: z / (1 + np.exp(-z))
  w = {k: np.asarray(v['kernel']) for k, v in params.items()}
  assert set(w) == {'gate', 'wi', 'wo'}  # no biases
  np.testing.assert_allclose(out, (silu(x @ w['gate']) * (x @ w['wi'])) @ w['wo'], rtol=1e-5,
                             atol=1e-5)

  from transformer.layers import norm  # pylint: disable=import-outside-toplevel
  rms = norm('n', cfg)
  scale = np.random.default_rng(1).normal(size=8).astype(np.float32)
  out = rms.apply({'params': {'scale': scale}}, x)
  expected = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 0.1) * scale
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


# --- Attention: grouped heads, QK-norm, rotary ----------------------------------------------------

def attention_oracle(x, w, num_heads, num_kv_heads, mask, qk_norm_scales=None, eps=1e-6,
                     rope=None):
  """softmax(q_h k_g^T / sqrt(E) + mask) v_g with g = h // (H / H_kv), concatenated, times W_O."""
  b, length, d = x.shape
  e = d // num_heads
  group = num_heads // num_kv_heads
  q = (x @ w['query']).reshape(b, length, num_heads, e)
  k = (x @ w['key']).reshape(b, length, num_kv_heads, e)
  v = (x @ w['value']).reshape(b, length, num_kv_heads, e)
  if qk_norm_scales is not None:  # over each head's E features
    rms = lambda t: t / np.sqrt((t ** 2).mean(-1, keepdims=True) + eps)
    q, k = rms(q) * qk_norm_scales[0], rms(k) * qk_norm_scales[1]
  if rope is not None:
    q, k = rope(q), rope(k)
  heads = []
  for h in range(num_heads):
    g = h // group
    scores = q[:, :, h] @ k[:, :, g].transpose(0, 2, 1) / np.sqrt(e)
    heads.append(softmax(np.where(mask, scores, -np.inf)) @ v[:, :, g])
  return np.concatenate(heads, -1) @ w['out']


def numpy_rope(theta):
  def rope(t):  # t [B, L, H, E], positions 0..L-1
    e = t.shape[-1]
    out = np.empty_like(t)
    for pos in range(t.shape[1]):
      for i in range(e // 2):
        angle = pos * theta ** (-2 * i / e)
        a, b = t[:, pos, :, i], t[:, pos, :, i + e // 2]
        out[:, pos, :, i] = a * np.cos(angle) - b * np.sin(angle)
        out[:, pos, :, i + e // 2] = b * np.cos(angle) + a * np.sin(angle)
    return out
  return rope


@pytest.mark.parametrize('num_kv_heads, qk_norm, rope_theta', [
    (2, False, None), (1, False, None), (4, True, None), (2, True, 100.0)],
    ids=['grouped', 'multi_query', 'qk_norm', 'grouped_qk_norm_rotary'])
def test_attention_matches_oracle(num_kv_heads, qk_norm, rope_theta):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 16)).astype(np.float32)
  mask = np.tril(np.ones((5, 5), bool))[None]
  layer = MultiHeadAttention(num_heads=4, num_kv_heads=num_kv_heads,
                             qk_norm='rmsnorm' if qk_norm else None, rope_theta=rope_theta)
  positions_BxL = jnp.broadcast_to(jnp.arange(5), (2, 5))
  args = (x, x, jnp.asarray(mask[:, None]))
  params = randomize(unbox_init(layer, *args, deterministic=True, positions_BxQ=positions_BxL))
  out = layer.apply({'params': params}, *args, deterministic=True, positions_BxQ=positions_BxL)
  w = {k: np.asarray(params[k]['kernel']) for k in ('query', 'key', 'value', 'out')}
  assert w['key'].shape == (16, num_kv_heads * 4)  # the cache holds only H_kv heads
  scales = ((np.asarray(params['query_norm']['scale']), np.asarray(params['key_norm']['scale']))
            if qk_norm else None)
  expected = attention_oracle(x, w, 4, num_kv_heads, mask, scales,
                              rope=numpy_rope(rope_theta) if rope_theta else None)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_low_rank_attention_matches_the_linformer_formula():
  """softmax(Q (E_k K)^T / sqrt(E)) (E_v V) per head, E_k and E_v [r, max_len] sliced to the L
  keys, padding keys zeroed before the projection (grouped-query heads)."""
  rng = np.random.default_rng(0)
  length, rank, max_len = 7, 3, 10
  x = rng.normal(size=(2, length, 16)).astype(np.float32)
  valid = np.ones((2, length), bool)
  valid[1, 5:] = False
  mask = jnp.asarray(valid[:, None, None, :])
  layer = MultiHeadAttention(num_heads=4, num_kv_heads=2, low_rank_dim=rank, max_len=max_len)
  params = randomize(unbox_init(layer, x, x, mask, deterministic=True))
  out = layer.apply({'params': params}, x, x, mask, deterministic=True)
  w = {k: np.asarray(params[k]['kernel']) for k in ('query', 'key', 'value', 'out')}
  e_k = np.asarray(params['key_length_projection'])[:, :length]
  e_v = np.asarray(params['value_length_projection'])[:, :length]
  heads = []
  for b in range(2):
    q = (x[b] @ w['query']).reshape(length, 4, 4)
    k = ((x[b] * valid[b, :, None]) @ w['key']).reshape(length, 2, 4)
    v = ((x[b] * valid[b, :, None]) @ w['value']).reshape(length, 2, 4)
    k_r, v_r = np.einsum('rk,kge->rge', e_k, k), np.einsum('rk,kge->rge', e_v, v)
    heads.append(np.concatenate([softmax(q[:, h] @ k_r[:, h // 2].T / 2.0) @ v_r[:, h // 2]
                                 for h in range(4)], -1) @ w['out'])
  np.testing.assert_allclose(out, np.stack(heads), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('packed', [False, True], ids=['prefix_len', 'packed'])
def test_local_prefix_lm_equals_full_attention_under_the_window(packed, monkeypatch):
  """unilm_prefix with local attention equals the same model with full attention whose mask also
  holds the window (the prefix mask, segments and T5 biases evaluated per block agree)."""
  config = unilm_prefix.get_config('tiny')
  config.update(positional='relative_bias', attention_kind='local', attention_window=4)
  model = variants.build_model(config, VOCAB)
  ids = jax.random.randint(jax.random.key(0), (2, 14), 4, VOCAB).at[1, 11:].set(0)
  if packed:  # two examples per row, each with its own source (token type 0)
    kwargs = dict(segment_ids=jnp.asarray([[1] * 7 + [2] * 7] * 2),
                  token_types=jnp.asarray([[0] * 3 + [1] * 4 + [0] * 4 + [1] * 3] * 2))
  else:
    kwargs = dict(prefix_len=jnp.asarray([5, 6]), token_types=jnp.zeros_like(ids))
  params = randomize(unbox_init(model, ids, **kwargs))
  local = model.apply({'params': params}, ids, **kwargs)
  config.attention_kind = 'full'
  full_model = variants.build_model(config, VOCAB)
  monkeypatch.setattr(models, 'self_attention_mask', lambda cfg, kind, valid, **parts:
                      masks.self_attention_mask(kind, valid, window=4, **parts))
  full = full_model.apply({'params': params}, ids, **kwargs)
  np.testing.assert_allclose(local, full, rtol=1e-4, atol=1e-5)
  monkeypatch.undo()  # and the window matters: without it the logits differ
  assert not np.allclose(full_model.apply({'params': params}, ids, **kwargs), local, atol=1e-3)


def test_rotary_scores_depend_only_on_distance():
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(1, 1, 1, 8)), rng.normal(size=(1, 1, 1, 8))
  def score(q_pos, k_pos):
    rq = positions.rotary(jnp.asarray(q, jnp.float32), jnp.array([[q_pos]]), 10000.0)
    rk = positions.rotary(jnp.asarray(k, jnp.float32), jnp.array([[k_pos]]), 10000.0)
    return float((rq * rk).sum())
  assert score(7, 3) == pytest.approx(score(104, 100), abs=1e-4)
  assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)


# --- Logit-bias positions ------------------------------------------------------------------------

def test_t5_buckets_match_a_hand_computed_table():
  # num_buckets 8, max_distance 20: bidirectional halves the buckets (4 per side): distances 0, 1
  # exact (max_exact 2), then 2 + floor(log(d / 2) / log(20 / 2) * 2), capped at 3; the future
  # (key after query) adds 4.
  relative = jnp.array([[[-30, -20, -9, -5, -3, -2, -1, 0, 1, 2, 3, 5, 9, 20, 30]]])
  expected_bidirectional = [3, 3, 3, 2, 2, 2, 1, 0, 5, 6, 6, 6, 7, 7, 7]
  # Causal: only the past, 8 buckets: exact up to 3 (max_exact 4), then
  # 4 + floor(log(d / 4) / log(20 / 4) * 4), capped at 7; the future is bucket 0.
  expected_causal = [7, 7, 6, 4, 3, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0]
  for bidirectional, expected in ((True, expected_bidirectional), (False, expected_causal)):
    got = positions.t5_bucket(relative, bidirectional=bidirectional, num_buckets=8,
                              max_distance=20)
    np.testing.assert_array_equal(np.asarray(got)[0, 0], expected, err_msg=str(bidirectional))


def test_alibi_is_minus_slope_times_distance():
  bias = np.asarray(positions.alibi_bias(jnp.array([[0, 1, 2]]), jnp.array([[0, 1, 2]]), 4))
  slopes = [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]  # 2^(-8h/H) for H = 4
  for h, slope in enumerate(slopes):
    np.testing.assert_allclose(bias[0, h], -slope * np.abs(np.subtract.outer([0, 1, 2],
                                                                              [0, 1, 2])))
  np.testing.assert_allclose(positions.alibi_slopes(6),  # 4 of H=4, then every other of H=8
                             [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3])


# --- Whole models: leakage, cache == full forward, parameter counts ------------------------------

MODERN = dict(norm='rmsnorm', ffn='gated', activation='silu', ffn_bias=False, num_kv_heads=1,
              qk_norm=True, pre_ln=True)
POSITIONALS = ['rotary', 'relative_bias', 'alibi']


def gpt(**overrides):
  config = gpt_causal.get_config('tiny')
  config.update(overrides)
  model = variants.build_model(config, VOCAB)
  x = jax.random.randint(jax.random.key(0), (2, 9), 4, VOCAB)
  return model, x, randomize(unbox_init(model, x))


def one_token_at_a_time(step, cache, ids_BxL):
  """Logits [B, L, V] of feeding ids through the cache one position at a time."""
  step, outs = jax.jit(step), []
  for t in range(ids_BxL.shape[1]):
    logits, mutated = step(cache, ids_BxL[:, t:t + 1])
    cache = mutated['cache']
    outs.append(logits[:, 0])
  return jnp.stack(outs, 1)


LOCAL = dict(attention_kind='local', attention_window=3)  # 3 blocks of the 9 tokens
STRIDED = dict(attention_kind='strided', attention_window=3)  # token 8 also reads 5 and 2
GLOBAL = dict(LOCAL, num_global_tokens=2)  # every token also reads the first two, which read all


@pytest.mark.parametrize('attention', [{}, LOCAL], ids=['full', 'local'])
@pytest.mark.parametrize('positional', POSITIONALS)
@pytest.mark.parametrize('modern', [False, True], ids=['paper_block', 'modern_block'])
def test_causal_lm_has_no_future_leakage_and_cache_equals_full(positional, modern, attention):
  model, x, params = gpt(positional=positional, **(MODERN if modern else {}), **attention)
  full = model.apply({'params': params}, x)
  changed = model.apply({'params': params}, x.at[:, 5:].set(3))
  np.testing.assert_allclose(full[:, :5], changed[:, :5], atol=1e-6)
  assert not np.allclose(full[:, 5:], changed[:, 5:])

  # Left-padded prompts through the cache: each row's logits equal its unpadded full forward.
  prompt = x[:, :4].at[0, :2].set(0)  # row 0: two pads, then two real tokens
  cache = decode.init_cache(model, 2, 9)
  step = jax.jit(lambda cache, ids: model.apply({'params': params, 'cache': cache}, ids,
                                                decode=True, mutable=['cache']))
  logits, mutated = step(cache, prompt)
  outs = [logits[:, -1]]
  for t in range(4, 9):
    logits, mutated = step(mutated['cache'], x[:, t:t + 1])
    outs.append(logits[:, 0])
  cached_BxTxV = jnp.stack(outs, 1)
  for row, start in ((0, 2), (1, 0)):
    alone = model.apply({'params': params}, x[row:row + 1, start:])
    np.testing.assert_allclose(cached_BxTxV[row], alone[0, 3 - start:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('positional', POSITIONALS)
def test_strided_causal_lm_has_no_future_leakage_and_cache_equals_full(positional):
  """The same checks for strided attention (the paper's block only: the block's switches do not
  touch the pattern), whose decoding reads the whole cache under the strided pattern over
  positions (the left-padded row's positions skip its pads)."""
  test_causal_lm_has_no_future_leakage_and_cache_equals_full(positional, False, STRIDED)


@pytest.mark.parametrize('positional', POSITIONALS)
def test_global_causal_lm_has_no_future_leakage_and_cache_equals_full(positional):
  """The same checks for local attention with global tokens (the paper's block), whose decoding
  reads a linear cache: a causal global query reads no later token, and every later one reads
  the globals; in the left-padded row they are its first real tokens (positions skip pads)."""
  test_causal_lm_has_no_future_leakage_and_cache_equals_full(positional, False, GLOBAL)


@pytest.mark.parametrize('attention', [{}, LOCAL, GLOBAL], ids=['full', 'local', 'global'])
@pytest.mark.parametrize('positional', POSITIONALS)
def test_encoder_decoder_cache_equals_full(positional, attention):
  config = original.get_config('tiny')
  config.update(positional=positional, **MODERN, **attention)
  model = variants.build_model(config, VOCAB)
  src = jax.random.randint(jax.random.key(0), (2, 7), 4, VOCAB).at[1, 5:].set(0)
  tgt = jax.random.randint(jax.random.key(1), (2, 9), 4, VOCAB)  # local: the ring wraps twice
  params = randomize(unbox_init(model, src, tgt))
  full = model.apply({'params': params}, src, tgt)
  encoded = model.apply({'params': params}, src, method='encode')
  cache = decode.init_cache(model, 2, 9, encoded_BxSxD=encoded, inputs_BxS=src)
  step = lambda cache, ids: model.apply({'params': params, 'cache': cache}, encoded, src, ids,
                                        decode=True, mutable=['cache'], method='decode')
  np.testing.assert_allclose(one_token_at_a_time(step, cache, tgt), full, atol=1e-4, rtol=1e-4)


def assert_prefill_then_steps_equal_full(model, params, cache, x_BxL, prefill=5):
  """Feeding x's first `prefill` tokens at once and the rest one at a time through the cache
  gives the logits of the full forward."""
  step = jax.jit(lambda cache, ids: model.apply({'params': params, 'cache': cache}, ids,
                                                decode=True, mutable=['cache']))
  first, mutated = step(cache, x_BxL[:, :prefill])
  rest = one_token_at_a_time(step, mutated['cache'], x_BxL[:, prefill:])
  full = jax.jit(lambda params, x: model.apply({'params': params}, x))(params, x_BxL)
  np.testing.assert_allclose(jnp.concatenate([first, rest], 1), full, atol=1e-4, rtol=1e-4)


def test_local_cache_is_a_ring_of_the_window_and_equals_full():
  """Local attention decodes through a ring buffer of attention_window slots whatever the decode
  length (memory O(w)); a 5-token prefill (the ring wraps inside it), then one token at a time
  over 4 windows, equals the full forward (learned positions)."""
  model, _, params = gpt(**LOCAL)
  x = jax.random.randint(jax.random.key(2), (2, 12), 4, VOCAB)
  cache = decode.init_cache(model, 2, 12)
  shapes = jax.tree.map(jnp.shape, cache)
  assert shapes == jax.tree.map(jnp.shape, decode.init_cache(model, 2, 48))
  assert shapes['stack']['layer_0']['self_attention']['cached_key'] == (2, 3, 2, 16)  # [B, C, G, E]
  assert_prefill_then_steps_equal_full(model, params, cache, x)


def test_global_tokens_decode_through_a_linear_cache_equal_to_full():
  """With global tokens every query reads the first ones however far back, so decoding keeps a
  cache as long as the decode, not a ring: a 5-token prefill, then one token at a time to 12
  tokens (the last reading keys 0 and 1, nine positions back), equals the full forward."""
  model, _, params = gpt(**GLOBAL)
  x = jax.random.randint(jax.random.key(2), (2, 12), 4, VOCAB)
  cache = decode.init_cache(model, 2, 12)
  key = cache['stack']['layer_0']['self_attention']['cached_key']
  assert key.shape == (2, 2, 12, 16)  # [B, G, C, E]
  assert_prefill_then_steps_equal_full(model, params, cache, x)


@pytest.mark.parametrize('attention', [LOCAL, GLOBAL], ids=['local', 'global'])
def test_local_prefix_lm_cache_equals_full(attention):
  """unilm_prefix with local attention (window 3) through the ring buffer, fed as decode.py does:
  sources longer than the window padded after their tokens (prefix_len counts the pads), here
  with the first two target tokens in the same call (the prefix mask then separates them from
  the source), then one token at a time. Each row's logits equal the full forward of its
  sequence without the source's pads. With global tokens (a linear cache) they are the source's
  first two tokens."""
  config = unilm_prefix.get_config('tiny')
  config.update(positional='relative_bias', **attention)
  model = variants.build_model(config, VOCAB)
  ids = jax.random.randint(jax.random.key(3), (2, 12), 4, VOCAB)
  source_lens, padded_len, steps = (6, 4), 7, 4
  prompt = jnp.stack([jnp.concatenate([ids[b, :n], jnp.zeros(padded_len - n, jnp.int32),
                                       ids[b, n:n + 2]]) for b, n in enumerate(source_lens)])
  rest = jnp.stack([ids[b, n + 2:n + 2 + steps] for b, n in enumerate(source_lens)])
  prefix_len = jnp.full((2,), padded_len)
  params = randomize(unbox_init(model, prompt, prefix_len=prefix_len))
  step = jax.jit(lambda cache, ids: model.apply({'params': params, 'cache': cache}, ids,
                                                prefix_len=prefix_len, decode=True,
                                                mutable=['cache']))
  # A linear cache (global tokens) needs a slot for every token fed, the source's pads included.
  cache = decode.init_cache(model, 2, padded_len + 2 + steps, prefix_len_B=prefix_len)
  prompt_logits, mutated = step(cache, prompt)
  rest_logits = one_token_at_a_time(step, mutated['cache'], rest)
  # Pads at the end of the shorter sequence change none of the logits before them.
  tight = jnp.where(jnp.arange(12)[None] < jnp.asarray(source_lens)[:, None] + 2 + steps, ids, 0)
  full = jax.jit(lambda params, ids: model.apply({'params': params}, ids, prefix_len=jnp.asarray(
      source_lens)))(params, tight)
  for b, n in enumerate(source_lens):
    cached = jnp.concatenate([prompt_logits[b, :n], prompt_logits[b, padded_len:],
                              rest_logits[b]])
    np.testing.assert_allclose(cached, full[b, :n + 2 + steps], atol=1e-4, rtol=1e-4)


def test_grouped_query_cache_holds_only_the_key_value_heads():
  model, _, _ = gpt(num_kv_heads=1, num_heads=2)
  cache = decode.init_cache(model, 2, 9)
  key = cache['stack']['layer_0']['self_attention']['cached_key']
  assert key.shape == (2, 1, 9, 16)  # [B, H_kv, C, E]: num_heads / num_kv_heads = 2x smaller


def count(**overrides):
  model, _, params = gpt(**overrides)
  del model
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def test_parameter_counts_of_each_switch():
  d, f, layers, v, heads = 32, 64, 2, VOCAB, 2  # gpt_causal:tiny, learned positions, pre-LN
  embed = v * d + 64 * d  # tokens + learned positions (max_len 64)
  layer = 4 * d * d + (d * f + f + f * d + d) + 2 * 2 * d  # attention, FFN, two LayerNorms
  base = embed + layers * layer + 2 * d  # + the final LayerNorm; the output is tied
  assert count() == base
  assert count(norm='rmsnorm') == base - (2 * layers + 1) * d  # no norm biases
  assert count(ffn='gated') == base + layers * (d * f + f)  # W_gate and its bias
  assert count(ffn_bias=False) == base - layers * (f + d)
  assert count(num_kv_heads=1) == base - layers * 2 * d * (d - d // heads)  # smaller W_K, W_V
  assert count(qk_norm=True) == base + layers * 2 * 2 * (d // heads)  # q and k LayerNorms over E
  assert count(positional='rotary') == base - 64 * d
  assert count(positional='relative_bias') == base - 64 * d + 32 * heads  # one table per stack
  assert count(attention_bias=True) == base + layers * 4 * d
  assert count(attention_kind='local') == base
  assert count(attention_kind='low_rank', low_rank_dim=5) == base + layers * 2 * 5 * 64  # E_k, E_v


# --- ALBERT: factorised embeddings and one layer shared by every depth ----------------------------

def test_albert_parameter_counts_are_exact():
  d, f, layers, v, e = 32, 64, 2, VOCAB, 8
  layer = 4 * d * d + (d * f + f + f * d + d) + 2 * 2 * d
  base = v * d + 64 * d + layers * layer + 2 * d  # gpt_causal:tiny
  assert count(share_layers=True) == base - (layers - 1) * layer
  # V x E tokens, 64 x E positions, E -> D projection (+ bias), D -> E before the tied output.
  assert count(embedding_dim=e) == v * e + 64 * e + (e * d + d) + layers * layer + 2 * d + d * e


def test_shared_layers_apply_one_block_at_every_depth():
  """share_layers equals a two-layer model whose two layers hold the same parameters, and differs
  from applying that block once."""
  model, x, params = gpt(share_layers=True)
  assert set(params['stack']) == {'layer', 'final_norm'}
  shared, final_norm = params['stack']['layer'], params['stack']['final_norm']
  two_layers, _, _ = gpt(num_layers=2)
  written_twice = dict(params, stack={'layer_0': shared, 'layer_1': shared,
                                      'final_norm': final_norm})
  np.testing.assert_allclose(model.apply({'params': params}, x),
                             two_layers.apply({'params': written_twice}, x), atol=1e-6)
  one_layer, _, _ = gpt(num_layers=1)
  once = dict(params, stack={'layer_0': shared, 'final_norm': final_norm})
  assert not np.allclose(model.apply({'params': params}, x),
                         one_layer.apply({'params': once}, x), atol=1e-3)


@pytest.mark.parametrize('overrides', [dict(share_layers=True), dict(embedding_dim=8)],
                         ids=['share_layers', 'embedding_dim'])
def test_albert_switches_decode_with_the_cache(overrides):
  model, x, params = gpt(**overrides)
  full = model.apply({'params': params}, x)
  step = lambda cache, ids: model.apply({'params': params, 'cache': cache}, ids, decode=True,
                                        mutable=['cache'])
  np.testing.assert_allclose(one_token_at_a_time(step, decode.init_cache(model, 2, 9), x), full,
                             atol=1e-4, rtol=1e-4)


def test_factorised_embedding_and_tied_output_match_their_definition():
  """Embedding: (E[id] * sqrt(W) + P[pos]) W_proj + b_proj; logits: (h W_to) E^T."""
  model, x, params = gpt(embedding_dim=8, num_layers=1)
  emb = params['embedder']
  table, pos = np.asarray(emb['tokens']['embedding']), np.asarray(emb['positions']['embedding'])
  embedded = ((table[np.asarray(x)] * np.sqrt(8) + pos[None, :x.shape[1]])
              @ np.asarray(emb['project']['kernel']) + np.asarray(emb['project']['bias']))
  _, state = model.apply({'params': params}, x, capture_intermediates=True)
  np.testing.assert_allclose(state['intermediates']['embedder']['__call__'][0], embedded,
                             rtol=1e-5, atol=1e-5)
  hidden = state['intermediates']['stack']['__call__'][0]
  logits = (np.asarray(hidden) @ np.asarray(params['output_head']['to_embedding']['kernel'])
            @ table.T)
  np.testing.assert_allclose(model.apply({'params': params}, x), logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('spec', ['modern_block_gpt', 'modern_block_original'])
def test_modern_block_sweep_holds_parameters_within_two_percent(spec):
  sweep = {'modern_block_gpt': modern_block_gpt,
           'modern_block_original': modern_block_original}[spec].get_sweep()
  path, size = sweep['config'].split(':')
  module = {'configs/gpt_causal.py': gpt_causal, 'configs/original.py': original}[path]
  counts = []
  for _, fields in sweep['runs']:
    config = module.get_config(size)
    config.update(dict(sweep['overrides'], **fields))
    model = variants.build_model(config, 8000)
    shapes = jax.eval_shape(lambda m=model, c=config: objectives.init_params(
        m, variants.example_batch(c), jax.random.key(0)))
    counts.append(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(shapes))))
  assert [name for name, _ in sweep['runs']] == ['paper', 'pre_ln', 'rmsnorm', 'swiglu', 'rotary',
                                                 'gqa', 'qk_norm']
  assert max(abs(c / counts[0] - 1) for c in counts) < 0.02, counts
