"""Decoding with the key/value cache: greedy, sampling and beam search, plus MLM fill-in.

One function per task, each jit-compiled once per input shape and setting (the model and the
decoding settings are static arguments); every token loop is a `lax.while_loop`:

  translate(model, params, inputs_BxS, max_len=...)   original, unilm_prefix: greedy, beam, sampling
  beam_search(...)                                    the same, returning all beams and their scores
  generate(model, params, prompt_BxP, max_len=...)    gpt_causal: greedy or sampling
  fill_mask(model, params, inputs_BxL)                bert_mlm: top-k predictions at mask positions

Conventions:
  * Outputs hold the generated tokens only: [B, T] with T = max_len, no bos, eos included, pad (0)
    after eos. A row that reaches max_len without eos simply ends there.
  * Pad is never generated (its logit is masked out): it only fills rows after eos.
  * The encoder (or the prompt, for one stack) runs once per batch; each step then feeds one token
    per row through the cache.
  * unilm_prefix's prompt is the source padded to S (pads after the source tokens) with
    prefix_len = S, then bos; token types are 0 on the source, 1 from bos on. The model's
    DecodeCursor neither attends to pads nor counts them in positions, so the padding is invisible.
  * generate's prompts are right-aligned: pad them on the left, for the same reason. The prompt's
    last token must be real: it is fed to produce the first new token.
  * Beams fold into the batch: row b * K + k holds beam k of example b (cache leaves [B*K, ...]).
  * cache=False recomputes the whole prefix at every step instead: the reference that tests and
    launch/benchmark_decode.py compare the cache against. Models with lsh attention always
    decode so: it has no cached form (transformer/attention_kinds.py).

Shape suffixes: B batch, K beams, N decoding rows (B or B*K), S source length, P prompt length,
T generated length, V vocabulary.
"""

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from transformer import models
from transformer.attention import FIXED_KV_CACHE
from transformer.layers import SCANNED_LAYERS
from transformer.special_ids import BOS_ID, EOS_ID, MASK_ID, PAD_ID

Array = jnp.ndarray


def init_cache(model, batch_size: int, cache_len: int, *, encoded_BxSxD=None, inputs_BxS=None,
               prefix_len_B=None):
  """A zeroed cache of `cache_len` slots for `model` (shapes via eval_shape: no parameters made);
  local attention's self-attention keeps attention_window slots instead, whatever cache_len
  (unless it has global tokens).

  Encoder-decoder models need the encoder output and source ids; a prefix-LM needs prefix_len.
  """
  tokens_BxC = jnp.ones((batch_size, cache_len), jnp.int32)

  def init_fn():
    if encoded_BxSxD is not None:
      return model.init(jax.random.key(0), encoded_BxSxD, inputs_BxS, tokens_BxC, decode=True,
                        method='decode')
    return model.init(jax.random.key(0), tokens_BxC, prefix_len=prefix_len_B, decode=True)

  shapes = jax.eval_shape(init_fn)['cache']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


# --- Choosing tokens ----------------------------------------------------------------------------

def _mask_pad(logits_NxV: Array) -> Array:
  return logits_NxV.at[..., PAD_ID].set(-jnp.inf)


def gnmt_length_penalty(length, alpha: float):
  """GNMT's lp = ((5 + length) / 6) ** alpha; beam scores are log-prob / lp."""
  return ((5.0 + length) / 6.0) ** alpha


def filter_logits(logits_NxV: Array, *, top_k: int = 0, top_p: float = 1.0) -> Array:
  """Sets logits outside the top_k most likely tokens, then outside the nucleus, to -inf.

  The nucleus is the smallest set of most likely tokens whose probability reaches top_p (the most
  likely token always stays). top_k=0 and top_p=1 keep everything; ties at a boundary stay.
  """
  if top_k:
    kth_Nx1 = lax.top_k(logits_NxV, min(top_k, logits_NxV.shape[-1]))[0][..., -1:]
    logits_NxV = jnp.where(logits_NxV >= kth_Nx1, logits_NxV, -jnp.inf)
  if top_p < 1.0:
    sorted_NxV = -jnp.sort(-logits_NxV, axis=-1)  # descending
    probs_NxV = jax.nn.softmax(sorted_NxV, axis=-1)
    mass_before_NxV = jnp.cumsum(probs_NxV, axis=-1) - probs_NxV
    # The nucleus is a prefix of the sorted tokens; its smallest logit is the threshold.
    threshold_Nx1 = jnp.min(jnp.where(mass_before_NxV < top_p, sorted_NxV, jnp.inf), axis=-1,
                            keepdims=True)
    logits_NxV = jnp.where(logits_NxV >= threshold_Nx1, logits_NxV, -jnp.inf)
  return logits_NxV


def sample_token(logits_NxV: Array, rng, *, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0) -> Array:
  """One token per row: argmax at temperature 0, else a sample of the filtered softmax(l / T)."""
  logits_NxV = _mask_pad(logits_NxV)
  if temperature == 0.0:
    return jnp.argmax(logits_NxV, axis=-1)
  logits_NxV = filter_logits(logits_NxV / temperature, top_k=top_k, top_p=top_p)
  return jax.random.categorical(rng, logits_NxV, axis=-1)


# --- Decoders: a state and a step that feeds it one token per row --------------------------------

class _Decoder(NamedTuple):
  state: Any  # A pytree; leaves with a leading row axis [N, ...], or scalars shared by all rows.
  step: Callable  # (state, ids_Nx1) -> (logits_NxV, state)


def _recompute_step(forward):
  """A step without cache: writes the token into the buffer and reruns `forward` on all of it."""

  def step(state, ids_Nx1):
    buffer_NxL, index = state
    buffer_NxL = lax.dynamic_update_slice(buffer_NxL, ids_Nx1, (0, index))
    logits_NxV = lax.dynamic_index_in_dim(forward(buffer_NxL), index, axis=1, keepdims=False)
    return logits_NxV, (buffer_NxL, index + 1)

  return step


def _recomputes(model, use_cache: bool) -> bool:
  """Whether decoding recomputes the prefix at every step: asked to, or lsh attention's model,
  whose buckets and their order are those of the whole sequence (no cached form)."""
  return not use_cache or model.cfg.attention_kind == 'lsh'


def _check_length(model, length: int):
  if model.cfg.positional == 'learned' and length > model.cfg.max_len:
    raise ValueError(f'Decoding {length} positions exceeds the learned positions of the model '
                     f'(max_len={model.cfg.max_len}); lower max_len or the prompt length.')


def _encoder_decoder(model, params, inputs_BxS, *, max_len: int, copies: int,
                     use_cache: bool) -> _Decoder:
  """Runs the encoder once; the decoder state holds `copies` rows per example."""
  _check_length(model, max(max_len, inputs_BxS.shape[1]))
  encoded_BxSxD = model.apply({'params': params}, inputs_BxS, method='encode')
  encoded_NxSxD = jnp.repeat(encoded_BxSxD, copies, axis=0)
  inputs_NxS = jnp.repeat(inputs_BxS, copies, axis=0)
  num_rows = inputs_NxS.shape[0]

  def apply(variables, ids_NxL, **kwargs):
    return model.apply(variables, encoded_NxSxD, inputs_NxS, ids_NxL, method='decode', **kwargs)

  if _recomputes(model, use_cache):
    forward = functools.partial(apply, {'params': params})
    return _Decoder((jnp.zeros((num_rows, max_len), jnp.int32), jnp.int32(0)),
                    _recompute_step(forward))

  def step(cache, ids_Nx1):
    logits_Nx1xV, mutated = apply({'params': params, 'cache': cache}, ids_Nx1, decode=True,
                                  mutable=['cache'])
    return logits_Nx1xV[:, 0], mutated['cache']

  # Decoding feeds bos and at most max_len - 1 generated tokens.
  cache = init_cache(model, num_rows, max_len, encoded_BxSxD=encoded_NxSxD, inputs_BxS=inputs_NxS)
  # A call with no new tokens stores the cross-attention's keys and values, which every step then
  # reads instead of projecting the encoder's output again (attention.fixed_kv).
  _, cache = apply({'params': params, 'cache': cache}, jnp.zeros((num_rows, 0), jnp.int32),
                   decode=True, mutable=['cache'])
  return _Decoder(cache['cache'], step)


def _single_stack(model, params, context_BxP, *, max_len: int, copies: int, use_cache: bool,
                  prefix_len=None) -> _Decoder:
  """Runs the context (prompt) once; the state holds `copies` rows per example.

  Token type 0 marks the context; generated tokens are type 1 in a prefix LM (its target part).
  The embedder ignores types when the model has no token-type embeddings.
  """
  context_NxP = jnp.repeat(context_BxP, copies, axis=0)
  num_rows, context_len = context_NxP.shape
  total_len = context_len + max_len
  _check_length(model, total_len)
  prefix_len_N = None if prefix_len is None else jnp.full((num_rows,), prefix_len, jnp.int32)
  new_type = int(model.mask_kind == 'prefix')

  if _recomputes(model, use_cache):
    buffer_NxL = jnp.concatenate([context_NxP, jnp.zeros((num_rows, max_len), jnp.int32)], 1)
    types_NxL = jnp.broadcast_to(jnp.arange(total_len) >= context_len, buffer_NxL.shape) * new_type

    def forward(ids_NxL):
      valid_NxL = (ids_NxL != PAD_ID).astype(jnp.int32)
      # As the DecodeCursor does: pads do not advance positions.
      positions_NxL = jnp.cumsum(valid_NxL, axis=1) - valid_NxL
      return model.apply({'params': params}, ids_NxL, positions=positions_NxL,
                         prefix_len=prefix_len_N, token_types=types_NxL)

    return _Decoder((buffer_NxL, jnp.int32(context_len)), _recompute_step(forward))

  def apply(cache, ids_NxL, token_type):
    logits_NxLxV, mutated = model.apply(
        {'params': params, 'cache': cache}, ids_NxL, prefix_len=prefix_len_N,
        token_types=jnp.full_like(ids_NxL, token_type), decode=True, mutable=['cache'])
    return logits_NxLxV, mutated['cache']

  def step(cache, ids_Nx1):
    logits_Nx1xV, cache = apply(cache, ids_Nx1, new_type)
    return logits_Nx1xV[:, 0], cache

  cache = init_cache(model, num_rows, total_len, prefix_len_B=prefix_len_N)
  if context_len:
    _, cache = apply(cache, context_NxP, 0)
  return _Decoder(cache, step)


def _seq2seq_decoder(model, params, inputs_BxS, *, max_len: int, copies: int,
                     use_cache: bool) -> _Decoder:
  """The decoder of a translation model: EncoderDecoder, or SingleStack with the prefix mask."""
  kwargs = dict(max_len=max_len, copies=copies, use_cache=use_cache)
  if isinstance(model, models.EncoderDecoder):
    return _encoder_decoder(model, params, inputs_BxS, **kwargs)
  if isinstance(model, models.SingleStack) and model.mask_kind == 'prefix':
    return _single_stack(model, params, inputs_BxS, prefix_len=inputs_BxS.shape[1], **kwargs)
  raise ValueError(f'Cannot translate with {type(model).__name__}; expected EncoderDecoder or '
                   "SingleStack(mask_kind='prefix').")


# --- Loops ---------------------------------------------------------------------------------------

def _sample_loop(decoder: _Decoder, first_N: Array, *, max_len: int, eos_id: int, rng,
                 **sampling) -> Array:
  """Feeds back one chosen token per row until every row emitted eos or max_len tokens."""
  num_rows = first_N.shape[0]

  def cond(carry):
    t, _, _, _, done_N = carry
    return (t < max_len) & ~jnp.all(done_N)

  def body(carry):
    t, state, last_N, tokens_NxT, done_N = carry
    logits_NxV, state = decoder.step(state, last_N[:, None])
    step_rng = None if rng is None else jax.random.fold_in(rng, t)
    next_N = jnp.where(done_N, PAD_ID, sample_token(logits_NxV, step_rng, **sampling))
    tokens_NxT = tokens_NxT.at[:, t].set(next_N)
    return t + 1, state, next_N, tokens_NxT, done_N | (next_N == eos_id)

  init = (jnp.int32(0), decoder.state, first_N, jnp.zeros((num_rows, max_len), jnp.int32),
          jnp.zeros((num_rows,), jnp.bool_))
  return lax.while_loop(cond, body, init)[3]


def _check_sampling(temperature: float, rng):
  if temperature < 0:
    raise ValueError(f'temperature must be >= 0, got {temperature}')
  if temperature > 0 and rng is None:
    raise ValueError('Sampling (temperature > 0) needs rng, e.g. jax.random.key(config.seed).')


def _keep_best(k: int, scores_BxM: Array, *arrays_BxM):
  """The k highest scores of M candidates (sorted), and the matching rows of each [B, M, ...]."""
  scores_BxK, index_BxK = lax.top_k(scores_BxM, k)
  return scores_BxK, *(
      jnp.take_along_axis(a, index_BxK.reshape(index_BxK.shape + (1,) * (a.ndim - 2)), axis=1)
      for a in arrays_BxM)


def _take_parents(state, parent_BxK: Array):
  """Each beam's decoder state from its parent's: row b * K + parent_BxK[b, k] for row b * K + k
  of every leaf with rows (a scanned stack's cache leaves hold its layers first, [layers, N,
  ...]); scalars are shared, and so are the cross-attention's keys and values, the same for
  every beam of an example. A parent is a beam of the same example, so the rows are taken within
  each example ([B, K] apart): split over devices by example, no device reads another's rows."""
  batch, k = parent_BxK.shape

  def take(path, x):
    if not x.ndim or getattr(path[-1], 'key', None) in FIXED_KV_CACHE:
      return x
    axis = int(any(getattr(key, 'key', None) == SCANNED_LAYERS for key in path))
    x_BxKx = x.reshape(x.shape[:axis] + (batch, k) + x.shape[axis + 1:])
    parent = parent_BxK.reshape((1,) * axis + (batch, k) + (1,) * (x.ndim - axis - 1))
    return jnp.take_along_axis(x_BxKx, parent, axis=axis + 1).reshape(x.shape)

  return jax.tree_util.tree_map_with_path(take, state)


def best_extensions(live_log_probs_BxK: Array, logits_NxV: Array, count: int):
  """The `count` best one-token extensions of K live beams, best first: their scores (the beam's
  log-prob plus the token's) [B, C], beams [B, C] and tokens [B, C], C = count; rows N = B * K.

  Each of the best `count` of all K * V extensions is among the best `count` of its own beam, so
  each beam's tokens are ranked first (by logit, the order of their log-probs) and only those
  K * count are scored and ranked: a beam step never adds K * V scores or sorts them together.
  """
  batch, k = live_log_probs_BxK.shape
  logits_NxV = _mask_pad(logits_NxV)
  per_beam = min(count, logits_NxV.shape[-1])
  top_logits_NxM, top_tokens_NxM = lax.top_k(logits_NxV, per_beam)
  log_probs_NxM = top_logits_NxM - jax.nn.logsumexp(logits_NxV, axis=-1, keepdims=True)
  scores_BxKxM = live_log_probs_BxK[..., None] + log_probs_NxM.reshape(batch, k, per_beam)
  scores_BxC, index_BxC = lax.top_k(scores_BxKxM.reshape(batch, k * per_beam), count)
  tokens_BxC = jnp.take_along_axis(top_tokens_NxM.reshape(batch, k * per_beam), index_BxC, axis=1)
  return scores_BxC, index_BxC // per_beam, tokens_BxC


class _Beams(NamedTuple):
  t: Array  # Tokens generated so far.
  state: Any  # Decoder state, rows [B*K, ...].
  live_BxKxT1: Array  # bos, then the tokens of beams still growing (pad after t).
  live_log_probs_BxK: Array  # Sorted; -inf marks an empty beam.
  finished_BxKxT1: Array  # bos, then the tokens of ended beams.
  finished_scores_BxK: Array  # log-prob / length penalty, sorted; -inf marks an empty slot.


@functools.partial(jax.jit, static_argnames=('model', 'max_len', 'beam_size', 'length_penalty',
                                             'bos_id', 'eos_id', 'cache'))
def beam_search(model, params, inputs_BxS, *, max_len: int, beam_size: int,
                length_penalty: float = 0.6, bos_id: int = BOS_ID, eos_id: int = EOS_ID,
                cache: bool = True) -> tuple[Array, Array]:
  """The beam_size best translations [B, K, T] (best first) and their scores [B, K].

  Each step ranks the K * V one-token extensions of the live beams by log-probability: those among
  the K best that end with eos are finished, the K best others stay live. A beam also ends at
  max_len tokens. Finished beams score log p(tokens) / gnmt_length_penalty(number of tokens, eos
  included). The search stops early once no live beam can beat the worst finished one, which
  requires length_penalty (alpha) >= 0. With one beam and alpha = 0 this is greedy decoding; with
  alpha > 0 a single beam may go on past greedy's eos, since longer outputs are penalised less.
  """
  batch, k = inputs_BxS.shape[0], beam_size
  decoder = _seq2seq_decoder(model, params, inputs_BxS, max_len=max_len, copies=k,
                             use_cache=cache)

  def cond(beams: _Beams):
    # A live beam's log-prob only falls and the penalty is largest at max_len: an upper bound.
    best_possible_B = beams.live_log_probs_BxK[:, 0] / gnmt_length_penalty(max_len, length_penalty)
    settled = jnp.all(beams.finished_scores_BxK[:, -1] >= best_possible_B)
    return (beams.t < max_len) & ~settled

  def body(beams: _Beams):
    t = beams.t
    last_N = lax.dynamic_index_in_dim(beams.live_BxKxT1, t, axis=2, keepdims=False).reshape(-1)
    logits_NxV, state = decoder.step(beams.state, last_N[:, None])
    # 2K candidates: even if K of them end with eos, K others can go on.
    scores_Bx2K, beam_Bx2K, token_Bx2K = best_extensions(beams.live_log_probs_BxK, logits_NxV,
                                                         2 * k)
    seqs_Bx2KxT1 = jnp.take_along_axis(beams.live_BxKxT1, beam_Bx2K[..., None], axis=1)
    seqs_Bx2KxT1 = seqs_Bx2KxT1.at[:, :, t + 1].set(token_Bx2K)
    ended_Bx2K = token_Bx2K == eos_id
    # A beam ends only if it ranks among the K best candidates (as greedy's does for K = 1).
    in_top_k_1x2K = (jnp.arange(2 * k) < k)[None]
    ended_scores_Bx2K = jnp.where(
        ended_Bx2K & in_top_k_1x2K, scores_Bx2K / gnmt_length_penalty(t + 1, length_penalty),
        -jnp.inf)
    finished_scores_BxK, finished_BxKxT1 = _keep_best(
        k, jnp.concatenate([beams.finished_scores_BxK, ended_scores_Bx2K], axis=1),
        jnp.concatenate([beams.finished_BxKxT1, seqs_Bx2KxT1], axis=1))
    live_log_probs_BxK, live_BxKxT1, parent_BxK = _keep_best(
        k, jnp.where(ended_Bx2K, -jnp.inf, scores_Bx2K), seqs_Bx2KxT1, beam_Bx2K)

    state = _take_parents(state, parent_BxK)
    return _Beams(t + 1, state, live_BxKxT1, live_log_probs_BxK, finished_BxKxT1,
                  finished_scores_BxK)

  live_BxKxT1 = jnp.zeros((batch, k, max_len + 1), jnp.int32).at[:, :, 0].set(bos_id)
  first_beam_only_BxK = jnp.broadcast_to(jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf), (batch, k))
  beams = lax.while_loop(cond, body, _Beams(
      jnp.int32(0), decoder.state, live_BxKxT1, first_beam_only_BxK, live_BxKxT1,
      jnp.full((batch, k), -jnp.inf)))
  # Beams still live end here: at max_len, or (early stop) unable to enter the finished ones.
  scores_BxK, tokens_BxKxT1 = _keep_best(
      k, jnp.concatenate([beams.finished_scores_BxK,
                          beams.live_log_probs_BxK / gnmt_length_penalty(beams.t, length_penalty)],
                         axis=1),
      jnp.concatenate([beams.finished_BxKxT1, beams.live_BxKxT1], axis=1))
  return tokens_BxKxT1[:, :, 1:], scores_BxK


# --- Public entry points -------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=('model', 'max_len', 'beam_size', 'length_penalty',
                                             'temperature', 'top_k', 'top_p', 'bos_id', 'eos_id',
                                             'cache'))
def translate(model, params, inputs_BxS, *, max_len: int, beam_size: int = 1,
              length_penalty: float = 0.6, temperature: float = 0.0, top_k: int = 0,
              top_p: float = 1.0, rng=None, bos_id: int = BOS_ID, eos_id: int = EOS_ID,
              cache: bool = True) -> Array:
  """Translations [B, max_len] of source ids [B, S] (pad 0 after each source).

  beam_size > 1: beam search; otherwise greedy (temperature 0) or sampling with temperature, top_k,
  top_p and rng. Works for EncoderDecoder and SingleStack(mask_kind='prefix').
  """
  _check_sampling(temperature, rng)
  if beam_size > 1:
    if temperature > 0:
      raise ValueError('Choose beam search (beam_size > 1) or sampling (temperature > 0).')
    tokens_BxKxT, _ = beam_search(model, params, inputs_BxS, max_len=max_len,
                                  beam_size=beam_size, length_penalty=length_penalty,
                                  bos_id=bos_id, eos_id=eos_id, cache=cache)
    return tokens_BxKxT[:, 0]
  decoder = _seq2seq_decoder(model, params, inputs_BxS, max_len=max_len, copies=1,
                             use_cache=cache)
  bos_B = jnp.full((inputs_BxS.shape[0],), bos_id, jnp.int32)
  return _sample_loop(decoder, bos_B, max_len=max_len, eos_id=eos_id, rng=rng,
                      temperature=temperature, top_k=top_k, top_p=top_p)


@functools.partial(jax.jit, static_argnames=('model', 'max_len', 'temperature', 'top_k', 'top_p',
                                             'eos_id', 'cache'))
def generate(model, params, prompt_BxP, *, max_len: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, rng=None, eos_id: int = EOS_ID,
             cache: bool = True) -> Array:
  """Continuations [B, max_len] of prompts [B, P] by a causal LM (SingleStack, mask 'causal').

  Prompts are right-aligned (pad on the left) and end with a real token, e.g. bos alone.
  Greedy at temperature 0, else sampling with temperature, top_k, top_p and rng.
  """
  _check_sampling(temperature, rng)
  if not (isinstance(model, models.SingleStack) and model.mask_kind == 'causal'):
    raise ValueError("generate needs SingleStack(mask_kind='causal'); use translate for "
                     'seq2seq models.')
  decoder = _single_stack(model, params, prompt_BxP[:, :-1], max_len=max_len, copies=1,
                          use_cache=cache)
  return _sample_loop(decoder, prompt_BxP[:, -1].astype(jnp.int32), max_len=max_len,
                      eos_id=eos_id, rng=rng, temperature=temperature, top_k=top_k, top_p=top_p)


@functools.partial(jax.jit, static_argnames=('model', 'top_k', 'mask_id'))
def fill_mask(model, params, inputs_BxL, *, top_k: int = 5, mask_id: int = MASK_ID,
              token_types_BxL=None) -> tuple[Array, Array]:
  """The top_k predictions at every mask position of a masked LM: (ids, probabilities) [B, L, k].

  Positions that are not masks get pad ids and probability 0.
  """
  logits_BxLxV = model.apply({'params': params}, inputs_BxL, token_types=token_types_BxL)
  probs_BxLxK, ids_BxLxK = lax.top_k(jax.nn.softmax(_mask_pad(logits_BxLxV), axis=-1), top_k)
  is_mask_BxLx1 = (inputs_BxL == mask_id)[..., None]
  return jnp.where(is_mask_BxLx1, ids_BxLxK, PAD_ID), jnp.where(is_mask_BxLx1, probs_BxLxK, 0.0)
