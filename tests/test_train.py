"""Train step: sharded == single-device, accumulation == big batch, schedule, overfitting."""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import bert_mlm, gpt_causal, original, unilm_prefix
from transformer import objectives, optim, sharding, train, variants

VOCAB = 40
CONFIGS = {'original': original, 'bert_mlm': bert_mlm, 'gpt_causal': gpt_causal,
           'unilm_prefix': unilm_prefix}


def tiny(variant, **overrides):
  config = CONFIGS[variant].get_config('tiny')
  config.update(dict(dropout_rate=0.0), **overrides)
  return config


def synthetic_batch(variant, batch_size=8, length=12, seed=0):
  """A fixed batch in the pipelines' format, with some padding so the masks matter."""
  rng = np.random.default_rng(seed)
  ids = lambda: rng.integers(7, VOCAB, (batch_size, length), dtype=np.int32)
  inputs, targets = ids(), ids()
  inputs[:, -2:] = 0
  targets[:, -3:] = 0
  batch = {'inputs': inputs, 'targets': targets, 'weights': (targets > 0).astype(np.float32)}
  if variant == 'original':
    bos = np.full((batch_size, 1), 2, np.int32)
    batch['decoder_inputs'] = np.concatenate([bos, targets[:, :-1]], 1)
  if variant == 'unilm_prefix':
    batch['prefix_len'] = np.full((batch_size,), 4, np.int32)
    batch['weights'][:, :4] = 0
  if variant == 'bert_mlm':
    batch['weights'] = (rng.random((batch_size, length)) < 0.3).astype(np.float32)
    batch['targets'] = np.where(batch['weights'] > 0, targets, 0).astype(np.int32)
  return batch


def initial_state_and_step(config, batch, devices=None):
  """(mesh, initial sharded state, jitted train step) for `config` over `devices`."""
  mesh = sharding.make_mesh(config, devices)
  model, optimizer = variants.build_model(config, VOCAB), optim.make_optimizer(config)
  _, shardings = train.abstract_state(model, optimizer, config, batch, mesh)
  state = train.create_state(model, optimizer, config, batch, shardings)
  return mesh, state, train.jit_train_step(model, optimizer, config, mesh, shardings)


def run_steps(config, batch, num_steps, devices=None):
  """Trains num_steps on `batch` over a mesh of `devices`; returns (state, losses)."""
  mesh, state, step = initial_state_and_step(config, batch, devices)
  global_batch = sharding.global_batch(batch, mesh)
  losses = []
  for _ in range(num_steps):
    state, metrics = step(state, global_batch)
    losses.append(metrics['loss'] / metrics['weight'])
  return state, np.asarray(jax.device_get(losses))


def assert_trees_close(a, b, **tol):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol), a, b)


def test_paper_schedule_values():
  d, warmup = 512, 4000
  schedule = optim.rsqrt_schedule(d, warmup)
  paper = lambda step: d ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)
  for step in (1, warmup, 4 * warmup):  # optax counts from 0: update number `step` is count-1
    np.testing.assert_allclose(schedule(step - 1), paper(step), rtol=1e-6)
  assert schedule(warmup - 1) > schedule(warmup // 2) and schedule(warmup - 1) > schedule(2 * warmup)


def test_logged_rate_is_the_rate_of_the_update_applied():
  """Adam's first update moves each parameter by -lr * g / (|g| + eps): the logged rate must be
  that lr, and each later step's logged rate the paper's at its update number."""
  d, warmup, multiplier = 32, 3, 2.0
  config = tiny('gpt_causal', schedule='rsqrt', learning_rate=multiplier, warmup_steps=warmup,
                d_model=d, weight_decay=0.0, grad_clip_norm=0.0)
  batch = synthetic_batch('gpt_causal')
  model, optimizer = variants.build_model(config, VOCAB), optim.make_optimizer(config)
  state = jax.jit(lambda: nn.unbox(train.init_state(model, optimizer, batch, config.seed)))()

  def mean_token_loss(params):
    return objectives.loss_and_metrics(objectives.forward(model, params, batch), batch,
                                       config.label_smoothing)[0] / batch['weights'].sum()

  grads = jax.jit(jax.grad(mean_token_loss))(state.params)
  step = jax.jit(functools.partial(train.train_step, model=model, optimizer=optimizer,
                                   config=config))
  new_state, metrics = step(state, batch)
  kernel = lambda tree: np.asarray(tree['stack']['layer_0']['ffn']['wi']['kernel'])
  g = kernel(grads)
  applied_rate = (kernel(state.params) - kernel(new_state.params)) / (g / (np.abs(g) + config.eps))
  big = np.abs(g) > 1e-4  # where eps does not blur the quotient
  np.testing.assert_allclose(applied_rate[big], float(metrics['learning_rate']), rtol=1e-3)
  paper = lambda n: multiplier * d ** -0.5 * min(n ** -0.5, n * warmup ** -1.5)
  for n in range(1, 6):
    np.testing.assert_allclose(float(metrics['learning_rate']), paper(n), rtol=1e-6)
    new_state, metrics = step(new_state, batch)


@pytest.fixture(scope='module')
def single_device_run():
  config = tiny('original', mesh_data=1)
  return run_steps(config, synthetic_batch('original'), 2, devices=jax.devices()[:1])


@pytest.mark.parametrize('mesh_shape', [dict(mesh_data=8), dict(mesh_data=2, mesh_fsdp=4),
                                        dict(mesh_data=2, mesh_fsdp=2, mesh_tensor=2)],
                         ids=['data8', 'data2xfsdp4', 'data2xfsdp2xtensor2'])
def test_sharded_step_equals_single_device_step(single_device_run, mesh_shape):
  state_1, losses_1 = single_device_run
  state_8, losses_8 = run_steps(tiny('original', **mesh_shape), synthetic_batch('original'), 2)
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  assert_trees_close(state_8.params, state_1.params, rtol=1e-4, atol=1e-5)


def test_fsdp_shards_parameters_and_optimizer_state():
  config = tiny('gpt_causal', mesh_data=1, mesh_fsdp=8)
  state, _ = run_steps(config, synthetic_batch('gpt_causal'), 1)
  kernel = state.params['stack']['layer_0']['ffn']['wi']['kernel']  # [D=32, F=64], D on fsdp
  assert kernel.sharding.spec[0] == 'fsdp'
  assert {s.data.shape for s in kernel.addressable_shards} == {(32 // 8, 64)}
  adam_mu = state.opt_state.inner_state[1][0].mu['stack']['layer_0']['ffn']['wi']['kernel']
  assert {s.data.shape for s in adam_mu.addressable_shards} == {(32 // 8, 64)}


def test_gradient_accumulation_equals_one_big_batch():
  batch = synthetic_batch('gpt_causal', batch_size=8)
  state_big, _ = run_steps(tiny('gpt_causal'), batch, 2)
  state_acc, _ = run_steps(tiny('gpt_causal', grad_accum_steps=4), batch, 2)
  assert_trees_close(state_acc.params, state_big.params, rtol=1e-4, atol=1e-6)
  assert int(state_acc.step) == 2  # one optimizer update per step, not per micro-batch


def test_gradient_accumulation_weighs_tokens_not_micro_batches():
  """Micro-batches of very different token counts: the update is still made of the gradient of the
  mean loss over all the batch's tokens, as one big batch. Averaging each micro-batch's own mean
  instead would count a token of a 2-token micro-batch 9 times as much as one of 18 tokens."""
  batch = synthetic_batch('gpt_causal', batch_size=8)
  # Micro-batch j of 4 holds rows j and j + 4 (train.split_microbatches): keep 9, 1, 2 and 3 real
  # tokens in each of its rows, so the micro-batches weigh 18, 2, 4 and 6 tokens.
  for row, kept in enumerate([9, 1, 2, 3] * 2):
    batch['weights'][row, kept:] = 0
  config = tiny('gpt_causal', grad_accum_steps=4)
  model, optimizer = variants.build_model(config, VOCAB), optim.make_optimizer(config)
  state = jax.jit(lambda: nn.unbox(train.init_state(model, optimizer, batch, config.seed)))()

  def mean_token_nll(params):  # the one-big-batch loss (label_smoothing is 0 for gpt_causal)
    log_p_BxLxV = jax.nn.log_softmax(objectives.forward(model, params, batch))
    nll_BxL = -jnp.take_along_axis(log_p_BxLxV, batch['targets'][..., None], axis=-1)[..., 0]
    return (nll_BxL * batch['weights']).sum() / batch['weights'].sum()

  grads = jax.jit(jax.grad(mean_token_nll))(state.params)
  norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
  step = functools.partial(train.train_step, model=model, optimizer=optimizer, config=config)
  new_state, metrics = jax.jit(step)(state, batch)
  np.testing.assert_allclose(metrics['grad_norm'], norm, rtol=1e-5)
  # Adam's first moment after one update: (1 - b1) x the gradient clipped to the global norm.
  clipped = jax.tree.map(lambda g: g * min(1.0, config.grad_clip_norm / norm), grads)
  assert_trees_close(new_state.opt_state.inner_state[1][0].mu,
                     jax.tree.map(lambda g: (1 - config.b1) * g, clipped), rtol=1e-4, atol=1e-8)


def test_nonfinite_update_is_skipped_and_counted():
  config = tiny('gpt_causal', on_nonfinite='skip', learning_rate=1e30, schedule='constant',
                warmup_steps=1, grad_clip_norm=0.0)
  batch = synthetic_batch('gpt_causal')
  mesh, state, step = initial_state_and_step(config, batch)
  skipped = 0
  for _ in range(3):  # the first update (rate 1e30) makes the next loss non-finite
    before = jax.device_get((state.params, state.opt_state))
    state, _ = step(state, sharding.global_batch(batch, mesh))
    if int(state.nonfinite_steps) > skipped:  # a skipped step leaves the state as it was
      skipped += 1
      jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before[0])
      jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state), before[1])
  assert skipped >= 1 and int(state.step) == 3
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_train_step_updates_the_donated_state_in_place():
  """No copy of a parameter or optimizer-state buffer in the compiled step: each is read and
  written where it lies (a select between the new and the old state made XLA copy both Adam
  moments of every parameter before updating them)."""
  config = tiny('gpt_causal', on_nonfinite='skip')
  batch = synthetic_batch('gpt_causal')
  mesh, state, step = initial_state_and_step(config, batch)
  hlo = step.lower(state, sharding.global_batch(batch, mesh)).compile().as_text()
  entry = hlo[hlo.index('\nENTRY'):]
  copied = re.findall(r'= (f32\[[\d,]+\])\{[\d,]*\} copy\(', entry)
  state_shapes = {f'f32[{",".join(map(str, x.shape))}]' for x in jax.tree.leaves(state.params)
                  if x.ndim}
  assert not [shape for shape in copied if shape in state_shapes], copied


@pytest.mark.parametrize('variant', list(CONFIGS))
def test_tiny_overfits_one_batch(variant):
  config = tiny(variant, schedule='constant', learning_rate=3e-3, warmup_steps=10,
                label_smoothing=0.0)
  # One device: 300 asynchronously queued 8-fake-device steps can starve XLA's CPU collectives.
  _, losses = run_steps(config, synthetic_batch(variant), 300, devices=jax.devices()[:1])
  assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
