"""Transformer-XL's segment-level recurrence (config.memory_length): the model against attention
over the concatenated segments, the stop-gradient, the streams of the data, evaluation with the
memory, and a resumed run against one that never stopped."""

import functools
import re
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import gpt_causal
from transformer import (config_checks, data, errors, evaluate, masks, objectives, optim, sharding,
                         train, variants)

VOCAB = 40
SEGMENT = 6


def xl_model(**overrides):
  config = gpt_causal.get_config('tiny')
  config.update(dict(dict(positional='rotary', memory_length=SEGMENT, dropout_rate=0.0),
                     **overrides))
  model = variants.build_model(config, VOCAB)
  x_BxL = jax.random.randint(jax.random.key(0), (2, 2 * SEGMENT), 4, VOCAB)
  params = nn.unbox(objectives.init_params(model, {'inputs': x_BxL}, jax.random.key(1)))
  # Random norm scales and biases too, so that every parameter takes part in the comparison.
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  params = treedef.unflatten([p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return model, x_BxL, params


def by_segments(model, params, x_BxL, memory=None):
  """Logits of x fed a segment at a time, each reading the memory the one before left."""
  segments = [{'inputs': x_BxL[:, i:i + SEGMENT]} for i in range(0, x_BxL.shape[1], SEGMENT)]
  memory = objectives.initial_memory(model, segments[0]) if memory is None else memory
  outs = []
  for segment in segments:
    logits, memory = objectives.forward_with_memory(model, params, memory, segment)
    outs.append(logits)
  return jnp.concatenate(outs, axis=1), memory


@pytest.mark.parametrize('positional, pre_ln, memory_length', [
    ('rotary', True, SEGMENT), ('relative_bias', False, SEGMENT), ('alibi', True, SEGMENT + 3),
    ('rotary', False, SEGMENT + 3)], ids=['rotary', 'relative_bias,post_ln', 'alibi,M>L',
                                          'rotary,post_ln,M>L'])
def test_two_segments_with_memory_equal_full_attention_over_both(positional, pre_ln,
                                                                 memory_length):
  """With a memory as long as the first segment, every layer of the second reads exactly the
  states that causal attention over the two segments together gives its keys: the first
  segment's states do not depend on the second. Extra memory slots hold nothing and are never
  read."""
  model, x_BxL, params = xl_model(positional=positional, pre_ln=pre_ln,
                                  memory_length=memory_length)
  together_BxLxV = objectives.forward(model, params, {'inputs': x_BxL})
  segmented_BxLxV, _ = by_segments(model, params, x_BxL)
  np.testing.assert_allclose(segmented_BxLxV, together_BxLxV, atol=2e-5, rtol=2e-5)


def test_a_memory_shorter_than_the_segment_reads_only_its_last_tokens(monkeypatch):
  """A one-layer model whose memory holds the last 2 tokens of the first segment: the second
  segment's logits equal attention over both segments where its queries may read only those 2
  of the first segment's keys (that mask written out here)."""
  model, x_BxL, params = xl_model(memory_length=2, num_layers=1)
  segmented_BxLxV, _ = by_segments(model, params, x_BxL)
  q_Lx1, k_1xL = np.arange(2 * SEGMENT)[:, None], np.arange(2 * SEGMENT)[None, :]
  allowed_LxL = (k_1xL <= q_Lx1) & ((q_Lx1 < SEGMENT) | (k_1xL >= SEGMENT - 2))
  plain = masks.self_attention_mask
  monkeypatch.setattr(masks, 'self_attention_mask', lambda kind, valid_BxL, **parts: plain(
      kind, valid_BxL, **parts) & allowed_LxL[None, None])
  oracle_BxLxV = objectives.forward(model, params, {'inputs': x_BxL})
  np.testing.assert_allclose(segmented_BxLxV[:, SEGMENT:], oracle_BxLxV[:, SEGMENT:], atol=2e-5,
                             rtol=2e-5)


def test_no_gradient_reaches_the_segment_that_made_the_memory():
  """The memory is a stop-gradient (SG in the paper's eq. 1): the second segment's loss has no
  gradient with respect to the parameters that computed the memory of the first."""
  model, x_BxL, params = xl_model()
  first, second = {'inputs': x_BxL[:, :SEGMENT]}, {'inputs': x_BxL[:, SEGMENT:]}

  def second_loss(params_of_first, params_of_second):
    _, memory = objectives.forward_with_memory(
        model, params_of_first, objectives.initial_memory(model, first), first)
    logits_BxLxV, _ = objectives.forward_with_memory(model, params_of_second, memory, second)
    return jnp.sum(jax.nn.log_softmax(logits_BxLxV)[..., 5])

  grads_first, grads_second = jax.grad(second_loss, argnums=(0, 1))(params, params)
  assert all(not np.any(g) for g in jax.tree.leaves(grads_first))
  assert all(np.any(g) for g in jax.tree.leaves(grads_second['stack']))


# --- The data: continuous streams ----------------------------------------------------------------

@pytest.fixture
def corpus(tmp_path):
  path = tmp_path / 'corpus.txt'
  path.write_text(''.join(f'line {i} says {"la " * (i % 5)}hello\n' for i in range(60)))
  return str(path)


def lm_config(tmp_path, corpus, **overrides):
  config = gpt_causal.get_config('tiny')
  config.update(dict(dict(
      data_dir=str(tmp_path / 'prepared'), dataset='text', text_train_files=corpus,
      text_eval_files=corpus, tokenizer='char', positional='rotary', memory_length=8,
      block_size=8, batch_size=8, eval_batch_size=8, log_every_steps=1, eval_every_steps=1000,
      checkpoint_every_steps=1000, max_eval_batches=2, peak_flops=1e11, num_cpu_devices=-1),
      **overrides))
  return config


def test_each_row_continues_its_stream_across_steps_processes_and_a_resume(tmp_path, corpus):
  config = lm_config(tmp_path, corpus)
  tokenizer = data.get_tokenizer(config)
  iterator = data.make_train_iterator(config, tokenizer)
  batches = [next(iterator) for _ in range(3)]
  state = iterator.get_state()
  later = [next(iterator) for _ in range(2)]
  batches += later
  stream = np.asarray(data.pipelines.split_examples(
      config, tokenizer, data.pipelines.get_objective(config, tokenizer), 'train', True
  ).examples.parts[0][0].read(0, 10 ** 6))
  per_stream = (len(stream) - 1) // config.block_size // config.batch_size
  for row in range(config.batch_size):
    read = np.concatenate([b['inputs'][row] for b in batches])
    start = row * per_stream * config.block_size
    np.testing.assert_array_equal(read, stream[start:start + len(read)])
  resumed = data.make_train_iterator(config, tokenizer)
  resumed.set_state(state)
  for expected in later:
    np.testing.assert_array_equal(next(resumed)['inputs'], expected['inputs'])
  # Two processes: each reads its half of the global batch's rows.
  for process in range(2):
    halves = data.make_train_iterator(config, tokenizer, process_index=process, process_count=2)
    for expected in batches:
      np.testing.assert_array_equal(next(halves)['inputs'], expected['inputs'][4 * process:][:4])


def test_evaluation_with_memory_equals_attention_over_two_windows(tmp_path):
  """A validation text of 4 windows of 8 tokens read as 2 streams of 2 windows with a memory of
  8: the same loss as reading it as 2 windows of 16 tokens with no memory."""
  path = tmp_path / 'short.txt'
  path.write_text('a short line of text, thirty.\n')  # 29 characters + eos: 30 tokens
  overrides = dict(eval_batch_size=2, max_eval_batches=0, text_train_files=str(path),
                   text_eval_files=str(path))
  config_xl = lm_config(tmp_path, str(path), **overrides)
  config_plain = lm_config(tmp_path, str(path), **dict(overrides, memory_length=0,
                                                       block_size=16))
  results = []
  for config in (config_xl, config_plain):
    tokenizer = data.get_tokenizer(config)
    batches = data.make_eval_batches(config, tokenizer)
    assert len(batches) == (2 if config.memory_length else 1)
    model = variants.build_model(config, tokenizer.vocab_size)
    if not results:
      params = nn.unbox(objectives.init_params(model, batches[0], jax.random.key(3)))
    ctx = types.SimpleNamespace(config=config, model=model,
                                mesh=sharding.make_mesh(config, jax.devices()[:2]))
    eval_fn = evaluate.jit_eval_step(model, config, ctx.mesh, None)
    results.append(evaluate.loss_metrics(ctx, eval_fn, params, batches))
  assert results[0]['tokens'] == results[1]['tokens'] == 29
  np.testing.assert_allclose(results[0]['loss'], results[1]['loss'], rtol=1e-5)


def test_a_resumed_run_equals_one_that_never_stopped(tmp_path, corpus):
  """The memory is saved with the train state and the streams resume where they were: 2 + 2
  steps give the parameters and memory of 4 steps."""
  run = lambda steps, name: train.train_and_evaluate(  # rsqrt: num_train_steps may change
      lm_config(tmp_path, corpus, num_train_steps=steps, schedule='rsqrt'), str(tmp_path / name))
  straight, _ = run(4, 'straight')
  run(2, 'resumed')
  resumed, _ = run(4, 'resumed')
  assert np.asarray(straight.memory['stack']['valid']).all()
  for a, b in zip(jax.tree.leaves((straight.params, straight.memory)),
                  jax.tree.leaves((resumed.params, resumed.memory))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_gradient_accumulation_gives_each_micro_batch_its_rows_memory(tmp_path, corpus):
  """A micro-batch takes rows j, j + k, ... of the batch: it must read and leave those rows'
  memory. Two steps in 2 micro-batches equal two steps over the whole batch."""
  states = []
  for accum in (1, 2):
    config = lm_config(tmp_path, corpus, grad_accum_steps=accum, dropout_rate=0.0)
    tokenizer = data.get_tokenizer(config)
    iterator = data.make_train_iterator(config, tokenizer)
    model = variants.build_model(config, tokenizer.vocab_size)
    optimizer = optim.make_optimizer(config)
    batch = next(iterator)
    state = jax.jit(lambda: nn.unbox(train.init_state(model, optimizer, batch, config.seed,
                                                      config.batch_size)))()
    step = jax.jit(functools.partial(train.train_step, model=model, optimizer=optimizer,
                                     config=config))
    for _ in range(2):
      state, _ = step(state, batch)
      batch = next(iterator)
    states.append(state)
  for a, b in zip(jax.tree.leaves((states[0].params, states[0].memory)),
                  jax.tree.leaves((states[1].params, states[1].memory))):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-4,
                               atol=1e-5)


@pytest.mark.parametrize('overrides, expected', [
    (dict(memory_length=-1), 'config.memory_length=-1 must be 0 (no memory) or positive'),
    (dict(variant='bert_mlm'), 'needs a language model over running text'),
    (dict(positional='learned'), 'needs relative positions (config.positional: rotary, '
                                 'relative_bias, alibi), not learned'),
    (dict(attention_kind='local'), 'needs config.attention_kind=full, not local'),
    (dict(packing=True), 'needs config.packing=False'),
    (dict(scan_layers=True), 'needs config.scan_layers=False'),
])
def test_config_problems_of_a_memory_are_named(overrides, expected):
  config = gpt_causal.get_config('tiny')
  config.update(dict(dict(positional='rotary', memory_length=8), **overrides))
  with pytest.raises(errors.ConfigError, match=re.escape(expected)):
    config_checks.check(config)
