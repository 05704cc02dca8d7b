"""Decoding: cache vs full forward passes, beam search vs greedy and brute force, sampling, MLM."""

import functools
import itertools
import re
import types

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from configs import bert_mlm, gpt_causal, original, unilm_prefix
from transformer import decode, evaluate, sharding, variants
from transformer.data.tokenizer import CharTokenizer
from transformer.special_ids import PAD_ID

VOCAB = 12
MAX_LEN = 8
# Random tiny models keep repeating a token, often unk (1). Calling it eos in most tests makes rows
# end at different steps, so that the handling of finished rows is exercised.
EOS = 1
CONFIGS = {'original': original, 'bert_mlm': bert_mlm, 'gpt_causal': gpt_causal,
           'unilm_prefix': unilm_prefix}
# Three sources of lengths 6, 4 and 2, padded after the tokens.
SOURCES = jnp.array([[7, 9, 11, 8, 10, 9], [10, 8, 8, 11, 0, 0], [9, 7, 0, 0, 0, 0]])
PROMPTS = jnp.array([[0, 0, 2, 8, 9], [2, 7, 7, 10, 11], [0, 0, 0, 0, 2]])  # right-aligned


def make_model(variant, vocab=VOCAB, seed=0, **overrides):
  """A tiny random model and its parameters; untied output so random outputs are less repetitive."""
  config = CONFIGS[variant].get_config('tiny')
  config.update(dict(tie_output=False, **overrides))
  model = variants.build_model(config, vocab)
  ids = jnp.ones((1, 4), jnp.int32)
  args = (ids, ids) if variant == 'original' else (ids,)
  kwargs = {'prefix_len': jnp.array([2])} if variant == 'unilm_prefix' else {}
  return model, nn.unbox(model.init(jax.random.key(seed), *args, **kwargs)['params'])


@functools.partial(jax.jit, static_argnums=0)
def apply_model(model, params, *args, **kwargs):
  """A forward pass, compiled: far cheaper than running a model op by op for each new shape."""
  return model.apply({'params': params}, *args, **kwargs)


@pytest.fixture(scope='module')
def tiny_models():
  return {variant: make_model(variant) for variant in CONFIGS}


def log_probs_without_pad(logits):
  """Next-token log-probabilities as decoding scores them: pad is never generated."""
  return jax.nn.log_softmax(jnp.where(jnp.arange(logits.shape[-1]) == PAD_ID, -jnp.inf, logits),
                            axis=-1)


def up_to_eos(tokens_BxT, eos_id=EOS):
  """Where the output is generated: up to and including the first eos."""
  is_eos = np.asarray(tokens_BxT) == eos_id
  return np.cumsum(is_eos, axis=1) - is_eos == 0


def assert_well_formed(tokens_BxT, eos_id=EOS):
  """Pad never generated, only pad after eos."""
  generated = up_to_eos(tokens_BxT, eos_id)
  assert np.all((np.asarray(tokens_BxT) != decode.PAD_ID) == generated), tokens_BxT


def full_forward_logits(variant, model, params, prompt_P, tokens_MxT):
  """Logits [M, T, V] predicting tokens_MxT after one prompt (for seq2seq: the source), from one
  training-style pass over each whole sequence, no cache. For one stack the prompt's pads are
  dropped (training packs source and target tightly) and the sequence is padded at its end."""
  num, length = tokens_MxT.shape
  apply = functools.partial(apply_model, model, params)
  bos_Mx1 = jnp.full((num, 1), decode.BOS_ID)
  if variant == 'original':
    sources_MxP = jnp.broadcast_to(prompt_P, (num, prompt_P.shape[0]))
    return apply(sources_MxP, jnp.concatenate([bos_Mx1, tokens_MxT[:, :-1]], 1))
  real = prompt_P[prompt_P != decode.PAD_ID]
  if variant == 'gpt_causal':  # The prompt's last token predicts the first new one.
    start, kwargs = len(real) - 1, {}
    new_M = tokens_MxT[:, :-1]
  else:  # unilm_prefix: source, then bos and the target.
    start = len(real)
    types = np.arange(prompt_P.shape[0] + length) >= start
    kwargs = dict(prefix_len=jnp.full((num,), start),
                  token_types=jnp.broadcast_to(types.astype(np.int32), (num, types.size)))
    new_M = jnp.concatenate([bos_Mx1, tokens_MxT[:, :-1]], 1)
  end_pads = jnp.zeros((num, prompt_P.shape[0] + length - start - new_M.shape[1]), jnp.int32)
  sequences = jnp.concatenate([jnp.broadcast_to(real, (num, len(real))), new_M, end_pads], 1)
  return apply(sequences, **kwargs)[:, start:start + length]


# --- Cache ---------------------------------------------------------------------------------------

@pytest.mark.parametrize('variant', ['original', 'unilm_prefix', 'gpt_causal'])
def test_greedy_is_argmax_of_full_forward(tiny_models, variant):
  """Cached greedy decoding of padded prompts picks, at every step, the argmax of a full forward
  pass over the unpadded prompt and the tokens so far."""
  model, params = tiny_models[variant]
  if variant == 'gpt_causal':
    prompts = PROMPTS
    tokens = decode.generate(model, params, prompts, max_len=MAX_LEN, eos_id=EOS)
  else:
    prompts = SOURCES
    tokens = decode.translate(model, params, prompts, max_len=MAX_LEN, eos_id=EOS)
  assert tokens.shape == (3, MAX_LEN)
  assert_well_formed(tokens)
  for prompt, row in zip(prompts, tokens):
    logits = full_forward_logits(variant, model, params, prompt, row[None])
    best = np.argmax(log_probs_without_pad(logits[0]), axis=-1)
    generated = up_to_eos(row[None])[0]
    np.testing.assert_array_equal(best[generated], np.asarray(row)[generated])


@pytest.mark.parametrize('variant, beam_size', [('original', 1), ('unilm_prefix', 3)])
def test_cache_matches_recompute(tiny_models, variant, beam_size):
  model, params = tiny_models[variant]
  settings = dict(max_len=MAX_LEN, beam_size=beam_size, eos_id=EOS)
  cached = decode.translate(model, params, SOURCES, **settings)
  recomputed = decode.translate(model, params, SOURCES, cache=False, **settings)
  np.testing.assert_array_equal(cached, recomputed)
  assert_well_formed(cached)


def test_local_attention_beams_through_the_ring_match_recompute(tiny_models):
  """original with local attention (window 2) decodes 8 tokens through a ring buffer of 2 slots,
  which beam search reorders with the rest of the cache at every step: the beams and their
  scores equal those of recomputing every prefix without a cache (no eos: all 8 steps run)."""
  _, params = tiny_models['original']  # local attention adds no parameters
  config = original.get_config('tiny')
  config.update(tie_output=False, attention_kind='local', attention_window=2)
  model = variants.build_model(config, VOCAB)
  settings = dict(max_len=MAX_LEN, beam_size=3, eos_id=-1)
  cached, cached_scores = decode.beam_search(model, params, SOURCES, **settings)
  recomputed, scores = decode.beam_search(model, params, SOURCES, cache=False, **settings)
  np.testing.assert_array_equal(cached, recomputed)
  np.testing.assert_allclose(cached_scores, scores, rtol=1e-5)


@pytest.mark.parametrize('overrides', [{}, dict(share_layers=True)], ids=['layers', 'shared'])
def test_encoder_decoder_beams_with_cached_cross_attention_match_recompute(overrides):
  """Beam search reads the cross-attention's keys and values from the cache (projected once per
  decode) and reorders the rest of it: beams and scores equal recomputing every prefix; also
  when one layer serves every depth (share_layers), each depth with its own cache."""
  model, params = make_model('original', **overrides)
  settings = dict(max_len=MAX_LEN, beam_size=3, eos_id=EOS)
  cached, cached_scores = decode.beam_search(model, params, SOURCES, **settings)
  recomputed, scores = decode.beam_search(model, params, SOURCES, cache=False, **settings)
  np.testing.assert_array_equal(cached, recomputed)
  np.testing.assert_allclose(cached_scores, scores, rtol=1e-5)


def _dot_operand_shapes(jaxpr, in_loop=False):
  """(shape, inside a while loop?) of every dot_general operand in `jaxpr` and its sub-jaxprs."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      found += [(tuple(v.aval.shape), in_loop) for v in eqn.invars]
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _dot_operand_shapes(sub, in_loop or eqn.primitive.name == 'while')
  return found


@pytest.mark.parametrize('beam_size', [1, 3])
def test_decoding_steps_do_not_project_the_encoder_output_again(tiny_models, beam_size):
  """The encoder output [N, S, D] enters products only before the token loop (the cross-attention
  keys and values, projected once); inside the loop no product reads it."""
  model, params = tiny_models['original']
  sources = jnp.ones((2, 11), jnp.int32)  # S = 11: no other dimension of the tiny model
  jaxpr = jax.make_jaxpr(functools.partial(decode.translate, model, max_len=MAX_LEN,
                                           beam_size=beam_size, eos_id=EOS))(params, sources)
  encoded = (2 * beam_size, 11, model.cfg.d_model)
  found = _dot_operand_shapes(jaxpr.jaxpr)
  assert (encoded, False) in found  # projected before the loop
  assert any(in_loop for _, in_loop in found)  # the loop has its products
  assert (encoded, True) not in found


def _loop_computations(hlo: str) -> str:
  """The text of every computation that the while loops of an optimized HLO module run (their
  bodies and what those call, fusions included)."""
  computations = {m.group(1): m.group(0) for m in
                  re.finditer(r'^%?([\w.-]+) [^\n]*\{\n.*?^\}', hlo, re.M | re.S)}
  todo = re.findall(r'\bbody=%?([\w.-]+)', hlo)
  seen = set()
  while todo:
    name = todo.pop()
    if name not in seen and name in computations:
      seen.add(name)
      todo += re.findall(r'(?:calls|to_apply|body|condition)=%?([\w.-]+)', computations[name])
  return '\n'.join(computations[name] for name in seen)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_beam_steps_copy_no_cache_into_another_layout_or_dtype(dtype):
  """The caches are held in the layouts and the dtype that the decoding step's products read:
  inside the token loop no transpose makes an array the size of a cache (the cross-attention's
  keys or values, or the self-attention's), and the program converts none to another dtype; each
  such copy would rewrite the whole cache at every step."""
  model, params = make_model('original', dtype=dtype)
  beams, source_len = 3, 11
  sources = jnp.ones((2, source_len), jnp.int32)
  hlo = decode.translate.lower(model, params, sources, max_len=MAX_LEN, beam_size=beams,
                               eos_id=EOS).compile().as_text()
  d_model = model.cfg.d_model
  cache_sizes = {2 * beams * source_len * d_model, 2 * beams * MAX_LEN * d_model}
  loop = _loop_computations(hlo)
  assert 'dot(' in loop or 'convolution(' in loop or 'fusion(' in loop  # the step is there
  transposed = [int(np.prod([int(d) for d in shape.split(',') if d]))
                for shape in re.findall(r'= \w+\[([\d,]*)\][^\n]*? transpose\(', loop)]
  assert not cache_sizes & set(transposed), transposed
  # Conversions as the program states them (XLA:CPU adds its own around products and selects
  # that it runs in float32): none of a whole cache.
  jaxpr = jax.make_jaxpr(lambda p, s: decode.translate(model, p, s, max_len=MAX_LEN,
                                                       beam_size=beams, eos_id=EOS))(params,
                                                                                     sources)
  converted = [int(np.prod(eqn.invars[0].aval.shape)) for eqn in _equations(jaxpr.jaxpr)
               if eqn.primitive.name == 'convert_element_type']
  assert not cache_sizes & set(converted), converted


def _equations(jaxpr, in_loop=False):
  """The equations that run inside while loops, in a jaxpr and in the jaxprs its equations hold
  (loop bodies, jitted calls)."""
  for eqn in jaxpr.eqns:
    if in_loop:
      yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          yield from _equations(sub, in_loop or eqn.primitive.name == 'while')


@pytest.mark.parametrize('positional', ['learned', 'sinusoidal'])
def test_gpt_cached_logits_of_left_padded_prompts_match_unpadded_forward(positional):
  """Every step's logits when generate's cache runs a batch of left-padded prompts equal those of
  a forward pass over each row's unpadded prompt and tokens alone: the pads are neither attended to
  nor counted in positions."""
  model, params = make_model('gpt_causal', positional=positional)

  @jax.jit
  def cached_greedy_logits(params, prompts_BxP):
    """generate's cached path: the prompt but its last token at once, then one token per step."""
    decoder = decode._single_stack(model, params, prompts_BxP[:, :-1], max_len=MAX_LEN, copies=1,
                                   use_cache=True)

    def step(carry, _):
      state, last_B = carry
      logits_BxV, state = decoder.step(state, last_B[:, None])
      return (state, jnp.argmax(logits_BxV.at[:, decode.PAD_ID].set(-jnp.inf), -1)), logits_BxV

    _, logits_TxBxV = jax.lax.scan(step, (decoder.state, prompts_BxP[:, -1]), length=MAX_LEN)
    return jnp.moveaxis(logits_TxBxV, 0, 1)

  cached_BxTxV = cached_greedy_logits(params, PROMPTS)  # greedy, never ending: MAX_LEN steps
  tokens_BxT = jnp.argmax(cached_BxTxV.at[..., decode.PAD_ID].set(-jnp.inf), axis=-1)
  for prompt, tokens_T, logits_TxV in zip(PROMPTS, tokens_BxT, cached_BxTxV):
    real = prompt[prompt != decode.PAD_ID]
    sequence = jnp.concatenate([real, tokens_T[:-1]])[None]  # no pad anywhere
    full_TxV = apply_model(model, params, sequence)[0, len(real) - 1:]
    np.testing.assert_allclose(logits_TxV, full_TxV, atol=1e-4, rtol=1e-4)


# --- Beam search ---------------------------------------------------------------------------------

def test_beam_of_one_is_greedy(tiny_models):
  # With a length penalty a single beam may go on past greedy's eos (longer outputs are penalised
  # less), so the two agree exactly at alpha = 0.
  model, params = tiny_models['original']
  beam, _ = decode.beam_search(model, params, SOURCES, max_len=MAX_LEN, beam_size=1,
                               length_penalty=0.0, eos_id=EOS)
  greedy = decode.translate(model, params, SOURCES, max_len=MAX_LEN, eos_id=EOS)
  np.testing.assert_array_equal(beam[:, 0], greedy)


def candidates(vocab, max_len, eos_id):
  """Every output: ends with (its only) eos within max_len tokens, or has max_len tokens, no eos."""
  tokens = range(decode.PAD_ID + 1, vocab)  # Pad is never generated.
  return [seq for n in range(1, max_len + 1) for seq in itertools.product(tokens, repeat=n)
          if eos_id not in seq[:-1] and (seq[-1] == eos_id or n == max_len)]


# The random models below favour token 2: as eos with alpha 0, the best outputs end at once; with
# eos 3 and alpha 0.6 they reach max_len. With seed 15 the first source's best output ends with eos
# after 2 tokens and beats a 1-token output only through its length penalty: a search that forgot
# the penalty of finished outputs would return the wrong one.
@pytest.mark.parametrize('variant, alpha, eos_id, seed, best_lengths, penalty_decides', [
    ('original', 0.6, 3, 1, (3, 3), False),
    ('unilm_prefix', 0.0, 2, 1, (1, 1), False),
    ('original', 0.6, 3, 15, (2, 1), True),
], ids=['to_max_len', 'alpha0_ends_at_once', 'penalty_decides'])
def test_wide_beam_finds_brute_force_best(variant, alpha, eos_id, seed, best_lengths,
                                          penalty_decides):
  vocab, max_len = 6, 3
  # A beam as wide as the candidates of any step (4 live prefixes at most continue with 5 tokens
  # each: not pad) makes the search exhaustive.
  beam_size = 4 ** (max_len - 1) * 5
  model, params = make_model(variant, vocab, seed=seed)
  sources = jnp.array([[5, 4, 5, 1], [1, 5, 4, 4]])
  tokens, scores = decode.beam_search(model, params, sources, max_len=max_len,
                                      beam_size=beam_size, length_penalty=alpha, eos_id=eos_id)
  cands = candidates(vocab, max_len, eos_id)
  targets = np.zeros((len(cands), max_len), np.int32)
  for i, seq in enumerate(cands):
    targets[i, :len(seq)] = seq
  lengths = np.array([len(seq) for seq in cands])
  ends_with_eos = np.array([seq[-1] == eos_id for seq in cands])
  # GNMT's length penalty, written out: lp(n) = ((5 + n) / 6)^alpha, n tokens with eos included.
  penalty = ((5.0 + lengths) / 6.0) ** alpha
  for b, source in enumerate(sources):
    logits = full_forward_logits(variant, model, params, source, jnp.asarray(targets))
    log_probs = jnp.take_along_axis(log_probs_without_pad(logits), targets[..., None], -1)[..., 0]
    in_output = np.arange(max_len)[None] < lengths[:, None]
    log_prob = np.where(in_output, log_probs, 0.0).sum(-1)
    brute = log_prob / penalty
    best, second = np.argsort(-brute)[:2]
    assert brute[best] - brute[second] > 1e-4  # a unique best
    np.testing.assert_array_equal(tokens[b, 0], targets[best])
    np.testing.assert_allclose(scores[b, 0], brute[best], rtol=1e-5)
    assert lengths[best] == best_lengths[b]
    # Finished outputs scored by their bare log-prob would lead to another output.
    unpenalised = np.where(ends_with_eos, log_prob, brute)
    assert (np.argmax(unpenalised) != best) == (penalty_decides and b == 0)


# --- Sampling ------------------------------------------------------------------------------------

PROBS = np.array([0.0, 0.4, 0.25, 0.15, 0.1, 0.06, 0.04])  # index 0 is pad


def kept(**kwargs):
  logits = jnp.log(jnp.asarray(PROBS[1:]))  # without pad: filter_logits knows nothing of it
  return set(np.flatnonzero(np.isfinite(decode.filter_logits(logits, **kwargs))) + 1)


def test_best_extensions_are_the_best_of_every_beam_and_token():
  # The definition: rank all K * V (beam, token) pairs by the beam's log-prob plus the token's
  # log-softmax (pad excluded). Sentence 0's best extensions all come from its first beam.
  rng = np.random.default_rng(0)
  batch, k, vocab, count = 3, 4, 50, 8
  live = -np.sort(rng.exponential(size=(batch, k)), axis=1)
  live[0, 1:] -= 100.0
  logits = 3.0 * rng.normal(size=(batch * k, vocab)).astype(np.float32)
  log_probs = np.asarray(log_probs_without_pad(jnp.asarray(logits)))
  flat = (live[..., None] + log_probs.reshape(batch, k, vocab)).reshape(batch, k * vocab)
  best = np.argsort(-flat, axis=1, kind='stable')[:, :count]
  scores, beams, tokens = decode.best_extensions(jnp.asarray(live, jnp.float32),
                                                 jnp.asarray(logits), count)
  np.testing.assert_array_equal(beams, best // vocab)
  np.testing.assert_array_equal(tokens, best % vocab)
  np.testing.assert_allclose(scores, np.take_along_axis(flat, best, axis=1), rtol=1e-5)
  assert (np.asarray(beams)[0] == 0).all()


def test_filter_logits_keeps_top_k_and_nucleus():
  assert kept() == {1, 2, 3, 4, 5, 6}
  assert kept(top_k=1) == {1}
  assert kept(top_k=3) == {1, 2, 3}
  assert kept(top_p=0.5) == {1, 2}  # 0.4 < 0.5 <= 0.65
  assert kept(top_p=0.7) == {1, 2, 3}
  assert kept(top_p=0.95) == {1, 2, 3, 4, 5}
  # The nucleus of the top-k distribution: renormalised 0.5, 0.31, 0.19.
  assert kept(top_k=3, top_p=0.7) == {1, 2}


def test_sample_token_draws_only_from_the_filtered_set():
  logits_NxV = jnp.log(jnp.broadcast_to(jnp.asarray(PROBS), (4000, len(PROBS))))
  sample = jax.jit(decode.sample_token, static_argnames=('temperature', 'top_k', 'top_p'))
  # Top 4 (pad has probability 0): 0.44, 0.28, 0.17, 0.11 after renormalising; nucleus 0.8.
  draws = np.asarray(sample(logits_NxV, jax.random.key(0), top_k=4, top_p=0.8))
  assert set(draws) == {1, 2, 3}
  np.testing.assert_allclose(np.mean(draws == 1), 0.4 / 0.8, atol=0.03)
  # Temperature 0 is argmax, and pad is never chosen even when most likely.
  pad_first = logits_NxV[:2].at[:, 0].set(10.0)
  np.testing.assert_array_equal(sample(pad_first, None, temperature=0.0), [1, 1])


def test_sampled_tokens_lie_in_the_model_filtered_set(tiny_models):
  model, params = tiny_models['gpt_causal']
  prompt = jnp.array([2, 7, 9])
  settings = dict(top_k=4, top_p=0.6)
  # Four samples of one prompt.
  tokens = decode.generate(model, params, jnp.broadcast_to(prompt, (4, 3)), max_len=MAX_LEN,
                           temperature=1.0, rng=jax.random.key(0), **settings)
  assert_well_formed(tokens, decode.EOS_ID)
  logits = full_forward_logits('gpt_causal', model, params, prompt, tokens)
  allowed = np.isfinite(decode.filter_logits(log_probs_without_pad(logits), **settings))
  chosen_allowed = np.take_along_axis(allowed, np.asarray(tokens)[..., None], -1)[..., 0]
  assert np.all(chosen_allowed[up_to_eos(tokens, decode.EOS_ID)])
  assert len({tuple(row) for row in np.asarray(tokens)}) > 1  # samples differ


def test_temperature_to_zero_is_greedy(tiny_models):
  model, params = tiny_models['original']
  settings = dict(max_len=MAX_LEN, eos_id=EOS)
  cold = decode.translate(model, params, SOURCES, temperature=1e-6, rng=jax.random.key(0),
                          **settings)
  np.testing.assert_array_equal(cold, decode.translate(model, params, SOURCES, **settings))


# --- Masked LM -----------------------------------------------------------------------------------

def test_fill_mask_returns_top_predictions_at_masks(tiny_models):
  model, params = tiny_models['bert_mlm']
  inputs = jnp.array([[7, decode.MASK_ID, 9, decode.MASK_ID, 0]])
  ids, probs = decode.fill_mask(model, params, inputs, top_k=3)
  assert ids.shape == probs.shape == (1, 5, 3)
  logits = apply_model(model, params, inputs)
  expected = jax.nn.softmax(log_probs_without_pad(logits), -1)
  for pos in (1, 3):
    np.testing.assert_array_equal(ids[0, pos], np.argsort(-expected[0, pos])[:3])
    np.testing.assert_allclose(probs[0, pos], np.sort(expected[0, pos])[::-1][:3], rtol=1e-5)
  assert np.all(ids[0, [0, 2, 4]] == decode.PAD_ID) and np.all(probs[0, [0, 2, 4]] == 0)


def _translation_context(**overrides):
  """A tiny random EncoderDecoder with a character tokenizer: what translate_texts reads of a
  ModelContext (config, tokenizer, model, mesh)."""
  config = original.get_config('tiny')
  config.update(dict(dict(eval_batch_size=8, decode_max_len=40, max_source_len=40,
                          num_cpu_devices=-1), **overrides))
  tokenizer = CharTokenizer('abcdefghijklmnopqrstuvwxyz ')
  model = variants.build_model(config, tokenizer.vocab_size)
  ids = jnp.ones((1, 8), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), ids, ids)['params'])
  ctx = types.SimpleNamespace(config=config, tokenizer=tokenizer, model=model,
                              mesh=sharding.make_mesh(config))
  return ctx, params


# Lengths 3 to 33 characters in a jumbled order: sorting, buckets and the last partial batch.
TEXTS = [('abcdefghijklmnopqrstuvwxyz abcdefg'[:n]) for n in (7, 33, 3, 20, 12, 30, 5, 17, 9,
                                                               25, 4, 14)]


def test_translate_texts_equals_each_sentence_decoded_alone():
  """Length-sorted, bucketed batches return each source's own translation, in input order."""
  ctx, params = _translation_context(translate_max_ratio=100.0)  # only decode_max_len caps
  outputs = evaluate.translate_texts(ctx, params, TEXTS, beam_size=3)
  encoded = [ctx.tokenizer.encode(source) for source in TEXTS]
  width = max(map(len, encoded))  # each alone in a row of one width: one compilation
  for source, ids, output in zip(TEXTS, encoded, outputs):
    row = np.zeros((1, width), np.int32)
    row[0, :len(ids)] = ids
    alone = decode.translate(ctx.model, params, jnp.asarray(row),
                             max_len=ctx.config.decode_max_len, beam_size=3,
                             length_penalty=ctx.config.length_penalty)
    assert output == ctx.tokenizer.decode(np.asarray(alone)[0]), source


@pytest.mark.parametrize('overrides, rows', [
    (dict(eval_batch_size=256), 16 * 8),  # the CPU's cap: 16 per data-parallel device
    (dict(eval_batch_size=24), 24),  # below the cap: the eval batch
    (dict(eval_batch_size=256, decode_batch_size=8), 8),  # set: as set
], ids=['cpu_cap', 'eval_batch', 'set'])
def test_translation_batches_hold_decode_batch_size_sentences(monkeypatch, overrides, rows):
  assert jax.device_count() == 8 and jax.default_backend() == 'cpu'  # the tests' fake devices
  ctx, params = _translation_context(**overrides)
  shapes = []
  translate = decode.translate
  monkeypatch.setattr(decode, 'translate', lambda model, params, inputs_BxS, **kwargs: (
      shapes.append(inputs_BxS.shape), translate(model, params, inputs_BxS, **kwargs))[1])
  outputs = evaluate.translate_texts(ctx, params, TEXTS * 3, beam_size=1)
  assert len(outputs) == len(TEXTS) * 3
  assert [rows for _ in range(-(-len(TEXTS) * 3 // rows))] == [shape[0] for shape in shapes]


def test_translations_end_within_the_ratio_of_their_bucketed_source():
  ctx, params = _translation_context(translate_max_ratio=1.0)
  outputs = evaluate.translate_texts(ctx, params, TEXTS, beam_size=1)
  bucket = evaluate.SOURCE_BUCKET
  longest = {}  # a sentence shares its batch's cap: the bucket of that batch's longest source
  order = sorted(range(len(TEXTS)), key=lambda i: -len(TEXTS[i]))
  for start in range(0, len(order), ctx.config.eval_batch_size):
    rows = order[start:start + ctx.config.eval_batch_size]
    cap = -(-len(TEXTS[rows[0]]) // bucket) * bucket
    longest.update({i: cap for i in rows})
  for i, output in enumerate(outputs):
    assert len(ctx.tokenizer.encode(output)) <= longest[i], (TEXTS[i], output)
  assert max(len(o) for o in outputs) > bucket  # the long batch was not cut to the short one's
