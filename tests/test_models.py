"""Model behaviour: no future leakage, cache == no-cache, parameter counts, forward/backward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import bert_mlm, gpt_causal, original, unilm_prefix
from transformer import decode, objectives, variants

VOCAB = 50
CONFIGS = {'original': original, 'bert_mlm': bert_mlm, 'gpt_causal': gpt_causal,
           'unilm_prefix': unilm_prefix}


def tiny(variant, **overrides):
  config = CONFIGS[variant].get_config('tiny')
  config.update(overrides)
  return config


def random_ids(seed, shape):
  return jax.random.randint(jax.random.key(seed), shape, 4, VOCAB)  # no pad/special ids


def init_params(model, *args, **kwargs):
  return nn.unbox(model.init(jax.random.key(1), *args, **kwargs)['params'])


@pytest.fixture(scope='module', params=[False, True], ids=['post_ln', 'pre_ln'])
def pre_ln(request):
  return request.param


def test_gpt_causal_no_future_leakage(pre_ln):
  model = variants.build_model(tiny('gpt_causal', pre_ln=pre_ln), VOCAB)
  x = random_ids(0, (2, 10))
  params = init_params(model, x)
  t = 4
  x_changed = x.at[:, t + 1:].set(random_ids(1, (2, 10 - t - 1)))
  apply = jax.jit(model.apply)
  before = apply({'params': params}, x)
  after = apply({'params': params}, x_changed)
  np.testing.assert_allclose(before[:, :t + 1], after[:, :t + 1], atol=1e-6)
  assert not np.allclose(before[:, t + 1:], after[:, t + 1:])


def test_original_decoder_no_future_leakage(pre_ln):
  model = variants.build_model(tiny('original', pre_ln=pre_ln), VOCAB)
  src, tgt = random_ids(0, (2, 7)), random_ids(1, (2, 9))
  params = init_params(model, src, tgt)
  t = 3
  tgt_changed = tgt.at[:, t + 1:].set(random_ids(2, (2, 9 - t - 1)))
  apply = jax.jit(model.apply)
  before = apply({'params': params}, src, tgt)
  after = apply({'params': params}, src, tgt_changed)
  np.testing.assert_allclose(before[:, :t + 1], after[:, :t + 1], atol=1e-6)
  assert not np.allclose(before[:, t + 1:], after[:, t + 1:])
  # ...while every decoder position does see the whole source.
  src_changed = src.at[:, -1].set((src[:, -1] + 1) % VOCAB)
  assert not np.allclose(before[:, 0], apply({'params': params}, src_changed, tgt)[:, 0])


def test_unilm_prefix_source_blind_to_target_and_target_causal(pre_ln):
  model = variants.build_model(tiny('unilm_prefix', pre_ln=pre_ln), VOCAB)
  x = random_ids(0, (2, 12))
  prefix_len = jnp.array([5, 7])
  params = init_params(model, x, prefix_len=prefix_len)
  apply = jax.jit(lambda ids: model.apply({'params': params}, ids, prefix_len=prefix_len))
  before = apply(x)
  # Changing everything from position 7 on (target of both rows) leaves all earlier outputs.
  after = apply(x.at[:, 7:].set(random_ids(1, (2, 5))))
  np.testing.assert_allclose(before[:, :7], after[:, :7], atol=1e-6)
  # Row 0's source (positions 0..4) never sees its target (5..): change position 5 only.
  after = apply(x.at[0, 5].set((x[0, 5] + 1) % VOCAB))
  np.testing.assert_allclose(before[0, :5], after[0, :5], atol=1e-6)
  assert not np.allclose(before[0, 5:], after[0, 5:])
  # The source is bidirectional: its first position sees its last.
  after = apply(x.at[0, 4].set((x[0, 4] + 1) % VOCAB))
  assert not np.allclose(before[0, 0], after[0, 0])


def test_bert_mlm_is_bidirectional():
  model = variants.build_model(tiny('bert_mlm'), VOCAB)
  x = random_ids(0, (1, 8))
  params = init_params(model, x)
  before = model.apply({'params': params}, x)
  after = model.apply({'params': params}, x.at[:, -1].set((x[:, -1] + 1) % VOCAB))
  assert not np.allclose(before[:, 0], after[:, 0])


def step_by_step(apply_step, cache, ids_BxL):
  """Feeds ids one at a time through the cache; returns stacked logits [B, L, V]."""
  apply_step = jax.jit(apply_step)
  outs = []
  for t in range(ids_BxL.shape[1]):
    logits, cache = apply_step(cache, ids_BxL[:, t:t + 1])
    outs.append(logits[:, 0])
  return jnp.stack(outs, axis=1)


@pytest.mark.parametrize('positional', ['sinusoidal', 'learned'])
def test_gpt_cache_matches_full_forward(pre_ln, positional):
  model = variants.build_model(tiny('gpt_causal', pre_ln=pre_ln, positional=positional), VOCAB)
  x = random_ids(0, (2, 9))
  params = init_params(model, x)
  full = model.apply({'params': params}, x)

  def apply_step(cache, ids):
    logits, mutated = model.apply({'params': params, 'cache': cache}, ids, decode=True,
                                  mutable=['cache'])
    return logits, mutated['cache']

  cache = decode.init_cache(model, 2, 9)
  np.testing.assert_allclose(step_by_step(apply_step, cache, x), full, atol=1e-5, rtol=1e-5)
  # A prefill of 4 tokens then single steps gives the same logits as well.
  prefill, cache = jax.jit(apply_step)(decode.init_cache(model, 2, 9), x[:, :4])
  rest = step_by_step(apply_step, cache, x[:, 4:])
  np.testing.assert_allclose(jnp.concatenate([prefill, rest], 1), full, atol=1e-5, rtol=1e-5)


def test_original_cache_matches_full_forward(pre_ln):
  model = variants.build_model(tiny('original', pre_ln=pre_ln), VOCAB)
  src = random_ids(0, (2, 7)).at[1, 5:].set(0)  # row 1 has source padding
  tgt = random_ids(1, (2, 8))
  params = init_params(model, src, tgt)
  variables = {'params': params}
  full = model.apply(variables, src, tgt)
  encoded = model.apply(variables, src, method='encode')

  def apply_step(cache, ids):
    logits, mutated = model.apply({'params': params, 'cache': cache}, encoded, src, ids,
                                  decode=True, mutable=['cache'], method='decode')
    return logits, mutated['cache']

  cache = decode.init_cache(model, 2, 8, encoded_BxSxD=encoded, inputs_BxS=src)
  np.testing.assert_allclose(step_by_step(apply_step, cache, tgt), full, atol=1e-5, rtol=1e-5)


def test_unilm_cache_matches_full_forward(pre_ln):
  model = variants.build_model(tiny('unilm_prefix', pre_ln=pre_ln), VOCAB)
  x = random_ids(0, (2, 10))
  prefix_len = jnp.array([4, 4])
  params = init_params(model, x, prefix_len=prefix_len)
  full = model.apply({'params': params}, x, prefix_len=prefix_len)

  def apply_step(cache, ids):
    logits, mutated = model.apply({'params': params, 'cache': cache}, ids, prefix_len=prefix_len,
                                  decode=True, mutable=['cache'])
    return logits, mutated['cache']

  cache = decode.init_cache(model, 2, 10, prefix_len_B=prefix_len)
  prefill, cache = apply_step(cache, x[:, :4])  # the whole source at once
  rest = step_by_step(apply_step, cache, x[:, 4:])
  np.testing.assert_allclose(jnp.concatenate([prefill, rest], 1), full, atol=1e-5, rtol=1e-5)


def test_unilm_padded_prompt_matches_unpadded():
  """Pads between a short source and its target neither get attended to nor shift positions."""
  model = variants.build_model(tiny('unilm_prefix'), VOCAB)
  src, tgt = random_ids(0, (1, 3)), random_ids(1, (1, 4))
  tight = jnp.concatenate([src, tgt], 1)
  params = init_params(model, tight, prefix_len=jnp.array([3]))
  full = model.apply({'params': params}, tight, prefix_len=jnp.array([3]))
  padded_src = jnp.concatenate([src, jnp.zeros((1, 2), jnp.int32)], 1)  # source padded to 5
  prefix_len = jnp.array([5])

  def apply_step(cache, ids):
    logits, mutated = model.apply({'params': params, 'cache': cache}, ids, prefix_len=prefix_len,
                                  decode=True, mutable=['cache'])
    return logits, mutated['cache']

  cache = decode.init_cache(model, 1, 9, prefix_len_B=prefix_len)
  prefill, cache = apply_step(cache, padded_src)
  rest = step_by_step(apply_step, cache, tgt)
  np.testing.assert_allclose(prefill[:, :3], full[:, :3], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(rest, full[:, 3:], atol=1e-5, rtol=1e-5)


def count_params(config, vocab_size):
  model = variants.build_model(config, vocab_size)
  args, kwargs = model.batch_arguments(variants.example_batch(config))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))['params']
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


def paper_parameter_count(vocab, d, d_ff, num_layers):
  """The paper's model, written out: one V x d embedding shared by the encoder, the decoder and
  the output projection (tied); sinusoidal positions (no parameters); attention W^Q, W^K, W^V, W^O
  without biases; FFN W1, b1, W2, b2; post-LN, a LayerNorm (gain, bias) after every sublayer and
  none at the end. Encoder layers have 2 sublayers, decoder layers 3 (with cross-attention)."""
  attention = 4 * d * d
  ffn = d * d_ff + d_ff + d_ff * d + d
  norm = 2 * d
  encoder_layer = attention + ffn + 2 * norm
  decoder_layer = 2 * attention + ffn + 3 * norm
  return vocab * d + num_layers * (encoder_layer + decoder_layer)


def test_paper_parameter_counts():
  base = count_params(original.get_config('base'), 37000)
  big = count_params(original.get_config('big'), 37000)
  assert base == paper_parameter_count(37000, 512, 2048, 6) == 63_045_632  # paper: 65 M
  assert big == paper_parameter_count(37000, 1024, 4096, 6) == 214_171_648  # paper: 213 M


def test_small_paper_keeps_the_papers_recipe_and_small_its_model():
  """original:small_paper trains as the paper's section 5 does (post-LN, dropout 0.1, label
  smoothing 0.1, Adam 0.9 / 0.98 / 1e-9, its rsqrt schedule): the ablations' baseline.
  original:small changes the recipe, not the model's shape."""
  paper, small = original.get_config('small_paper'), original.get_config('small')
  assert (paper.pre_ln, paper.dropout_rate, paper.label_smoothing, paper.schedule, paper.b1,
          paper.b2, paper.eps) == (False, 0.1, 0.1, 'rsqrt', 0.9, 0.98, 1e-9)
  assert count_params(paper, 8000) == paper_parameter_count(8000, 256, 1024, 3) == 7_568_384
  shape = ('d_model', 'num_heads', 'num_layers', 'num_decoder_layers', 'd_ff', 'vocab_size',
           'share_embeddings', 'tie_output', 'batch_size', 'packing')
  assert [small[f] for f in shape] == [paper[f] for f in shape]


def single_stack_parameter_count(vocab, d, d_ff, num_layers, num_token_types):
  """One pre-LN stack, written out: the tied V x d embedding, a d-wide embedding per token type,
  and per layer self-attention without biases, the FFN with biases and two LayerNorms; one final
  LayerNorm."""
  layer = 4 * d * d + (d * d_ff + d_ff + d_ff * d + d) + 2 * 2 * d
  return vocab * d + num_token_types * d + num_layers * layer + 2 * d


def test_unilm_prefix_small_matches_original_small_in_parameters_and_steps():
  """docs/results.md compares the single stack with the encoder-decoder: that holds at equal
  parameters (within 0.1%), steps and packed rows, with the same recipe."""
  unilm, encdec = unilm_prefix.get_config('small'), original.get_config('small')
  unilm_params = single_stack_parameter_count(8000, 256, 1024, 7, 2)
  encdec_params = paper_parameter_count(8000, 256, 1024, 3) + 2 * 2 * 256  # + two final norms
  assert count_params(unilm, 8000) == unilm_params == 7_570_176
  assert count_params(encdec, 8000) == encdec_params == 7_569_408
  assert abs(unilm_params - encdec_params) / encdec_params < 1e-3
  recipe = ('num_train_steps', 'batch_size', 'packing', 'pre_ln', 'positional', 'dropout_rate',
            'schedule', 'learning_rate', 'warmup_steps', 'label_smoothing',
            'average_last_checkpoints')
  assert [unilm[f] for f in recipe] == [encdec[f] for f in recipe]


@pytest.mark.parametrize('variant', list(CONFIGS))
def test_tiny_forward_backward_on_8_devices(variant):
  assert jax.device_count() == 8
  config = tiny(variant)
  model = variants.build_model(config, VOCAB)
  b, length = 8, 12
  x = random_ids(0, (b, length))
  batch = {'inputs': x, 'targets': random_ids(1, (b, length)),
           'weights': jnp.ones((b, length))}
  if variant == 'original':
    batch['decoder_inputs'] = random_ids(2, (b, length))
  if variant == 'unilm_prefix':
    batch['prefix_len'] = jnp.full((b,), 5)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  batch = jax.device_put(batch, NamedSharding(mesh, P('data')))
  params = nn.unbox(objectives.init_params(model, batch, jax.random.key(1)))

  @jax.jit
  def loss_and_grad(params, batch):
    def loss_fn(p):
      logits = objectives.forward(model, p, batch, deterministic=False,
                                  rngs={'dropout': jax.random.key(3)})
      loss_sum, metrics = objectives.loss_and_metrics(logits, batch, config.label_smoothing)
      return loss_sum / metrics['weight']
    return jax.value_and_grad(loss_fn)(params)

  loss, grads = loss_and_grad(params, batch)
  assert np.isfinite(loss) and loss > 0
  grad_norm = jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads)))
  assert np.isfinite(grad_norm) and grad_norm > 0
