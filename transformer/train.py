"""Training and evaluation: pure jitted steps, and the loop that feeds them and saves the results.

Data flows one way: config -> data -> model -> objective -> train step -> checkpoint / metrics.
`train_step` (here) and `evaluate.eval_step` are pure functions of (state or params, batch);
everything with side effects (input, logging, checkpoints) lives in `train_and_evaluate`.
"""

import functools
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from transformer import (checkpoint, context, data, distributed, errors, evaluate, objectives,
                         optim, perf, precision, sharding)
from transformer import workdir as workdir_lib
from transformer.writer import MetricWriter, log_progress


class NonFiniteLossError(errors.UserError, FloatingPointError):
  """Training diverged under on_nonfinite='stop': the message says what to change."""


@flax.struct.dataclass
class TrainState:
  """Everything a run carries from step to step; checkpointed whole."""
  step: jax.Array  # Train steps taken (batches consumed).
  params: Any
  opt_state: Any
  rng: jax.Array  # uint32[2] key data; dropout uses fold_in(rng, step).
  nonfinite_steps: jax.Array  # Steps whose update was skipped for a non-finite loss or gradient.
  first_nonfinite_step: jax.Array  # The first such step, or -1.
  # Transformer-XL (config.memory_length): what each row's stream left for the next batch's row
  # (objectives.forward_with_memory); {} without one.
  memory: Any


def _rows(batch: dict, num_rows: int) -> dict:
  return jax.tree.map(lambda x: jnp.zeros((num_rows, *x.shape[1:]), x.dtype), batch)


def init_state(model, optimizer, batch: dict, seed: int, memory_rows: int = 0) -> TrainState:
  """A fresh state; its params are nn.Partitioned boxes (logical axes) for sharding decisions.
  memory_rows: the batch size, for a model with a Transformer-XL memory (0: none)."""
  init_rng, dropout_rng = jax.random.split(jax.random.key(seed))
  params = objectives.init_params(model, batch, init_rng)
  memory = objectives.initial_memory(model, _rows(batch, memory_rows)) if memory_rows else {}
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params),
                    rng=jax.random.key_data(dropout_rng),
                    nonfinite_steps=jnp.zeros((), jnp.int32),
                    first_nonfinite_step=jnp.full((), -1, jnp.int32), memory=memory)


def split_microbatches(batch: dict, num_micro: int) -> dict:
  """[B, ...] -> [k, B/k, ...]. Micro-batch j takes rows j, j+k, j+2k...: each device keeps its
  own rows, so no data moves between devices."""
  def split(x):
    return jnp.moveaxis(x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:]), 1, 0)
  return jax.tree.map(split, batch)


def merge_microbatches(split: dict) -> dict:
  """The inverse of split_microbatches: [k, B/k, ...] -> [B, ...]."""
  return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1).reshape(-1, *x.shape[2:]), split)


def train_step(state: TrainState, batch: dict, *, model, optimizer, config):
  """One optimizer update over `batch` (accumulated over config.grad_accum_steps micro-batches).

  Gradients are of the summed token loss, divided once by the total token weight: accumulating k
  micro-batches is exactly one update on the k-times-larger batch.
  A Transformer-XL memory (state.memory) goes in with the batch's rows and comes out with them.
  Returns (new state, metrics: token sums plus grad_norm and learning_rate).
  """
  dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

  def micro_step(carry, micro_memory_and_index):
    grad_sum, metric_sum = carry
    micro, memory, index = micro_memory_and_index

    def loss_fn(params):
      rngs = {'dropout': jax.random.fold_in(dropout_rng, index)}
      if config.memory_length:
        logits, new_memory = objectives.forward_with_memory(model, params, memory, micro,
                                                            deterministic=False, rngs=rngs)
      else:
        logits, new_memory = objectives.forward(model, params, micro, deterministic=False,
                                                rngs=rngs), memory
      loss, metrics = objectives.loss_and_metrics(logits, micro, config.label_smoothing)
      return loss, (metrics, new_memory)

    grads, (metrics, new_memory) = jax.grad(loss_fn, has_aux=True)(state.params)
    return (jax.tree.map(jnp.add, grad_sum, grads),
            jax.tree.map(jnp.add, metric_sum, metrics)), new_memory

  num_micro = config.grad_accum_steps
  zeros = (jax.tree.map(jnp.zeros_like, state.params),
           {k: jnp.zeros((), jnp.float32) for k in ('loss', 'nll', 'accuracy', 'weight')})
  if num_micro == 1:  # No loop: a one-trip while loop would copy every gradient buffer.
    (grad_sum, metrics), new_memory = micro_step(zeros, (batch, state.memory, 0))
  else:  # A micro-batch's memory rows are its batch rows (both are batch-first).
    (grad_sum, metrics), split_memory = jax.lax.scan(
        micro_step, zeros, (split_microbatches(batch, num_micro),
                            split_microbatches(state.memory, num_micro), jnp.arange(num_micro)))
    new_memory = merge_microbatches(split_memory)
  grads = jax.tree.map(lambda g: g / jnp.maximum(metrics['weight'], 1.0), grad_sum)
  grad_norm = optax.tree.norm(grads)

  finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(grad_norm)

  # A branch rather than a select between the new and the old state: with a select, XLA copied
  # both Adam moments of every parameter each step (it reads the old moments after writing the
  # new ones in place); the branch updates the donated buffers where they lie.
  def update(operands):
    params, opt_state, _ = operands
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_opt_state, new_memory

  params, opt_state, memory = jax.lax.cond(finite, update, lambda operands: operands,
                                           (state.params, state.opt_state, state.memory))
  bad = jnp.logical_not(finite)
  new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state, memory=memory,
      nonfinite_steps=state.nonfinite_steps + bad.astype(jnp.int32),
      first_nonfinite_step=jnp.where(bad & (state.first_nonfinite_step < 0), state.step,
                                     state.first_nonfinite_step))
  metrics = dict(metrics, grad_norm=grad_norm,
                 learning_rate=optim.learning_rate(new_state.opt_state))  # of the last update
  return new_state, metrics


def _init_state(model, optimizer, config, example_batch: dict) -> TrainState:
  return init_state(model, optimizer, _rows(example_batch, 1), config.seed,
                    config.batch_size if config.memory_length else 0)


def abstract_state(model, optimizer, config, example_batch: dict, mesh):
  """(abstract unboxed state carrying shardings, state shardings), allocating nothing."""
  boxed = jax.eval_shape(lambda: _init_state(model, optimizer, config, example_batch))
  abstract, shardings = context.abstract_tree(boxed, mesh)
  # A memory's rows are the batch's: split over the devices as the batch is.
  memory_shardings = jax.tree.map(lambda _: sharding.batch_sharding(mesh), shardings.memory)
  abstract = abstract.replace(memory=jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract.memory,
      memory_shardings))
  return abstract, shardings.replace(memory=memory_shardings)


def create_state(model, optimizer, config, example_batch: dict, shardings) -> TrainState:
  """A fresh state, initialised directly into its shardings (never whole on one device)."""
  make = lambda: nn.unbox(_init_state(model, optimizer, config, example_batch))
  return jax.jit(make, out_shardings=shardings)()


def jit_train_step(model, optimizer, config, mesh, state_shardings):
  """train_step compiled over the mesh: (state, batch) -> (state, metrics), the state donated."""
  step = functools.partial(train_step, model=model, optimizer=optimizer, config=config)
  return jax.jit(step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, None), donate_argnums=0)


class Experiment(context.ModelContext):
  """What a run is made of: the model's context (tokenizer, mesh, model), optimizer, eval data."""

  def __init__(self, config):
    super().__init__(config)
    self.optimizer = optim.make_optimizer(config)
    self.eval_batches = data.make_eval_batches(
        config, self.tokenizer, 'validation', process_index=jax.process_index(),
        process_count=jax.process_count())

  def abstract_state(self):
    return abstract_state(self.model, self.optimizer, self.config, self.eval_batches[0],
                          self.mesh)


def _summarize_train(metric_list: list[dict]) -> dict:
  fetched = jax.device_get(metric_list)  # The only host sync: once per logging period.
  sums = {k: sum(float(m[k]) for m in fetched) for k in ('loss', 'nll', 'accuracy', 'weight')}
  out = {f'train_{k}': v for k, v in objectives.summarize(sums).items()}
  out['grad_norm'] = float(np.mean([m['grad_norm'] for m in fetched]))
  out['learning_rate'] = float(fetched[-1]['learning_rate'])
  return out


def _check_finite(state: TrainState, config) -> int:
  """The number of skipped non-finite steps; raises under on_nonfinite='stop'."""
  bad_steps, first = jax.device_get((state.nonfinite_steps, state.first_nonfinite_step))
  if bad_steps and config.on_nonfinite == 'stop':
    raise NonFiniteLossError(
        f'Non-finite loss or gradient at step {int(first) + 1} ({int(bad_steps)} step(s) so '
        'far). Its update was not applied and nothing after it was saved. Lower the learning '
        'rate, or set --config.on_nonfinite=skip to skip such updates.')
  return int(bad_steps)


class _Throughput:
  """Tokens/s, step time and MFU over a logging period (the first step's compile excluded)."""

  def __init__(self, config, vocab_size: int):
    self.config, self.vocab_size = config, vocab_size
    self.peak_flops = config.peak_flops or precision.measure_matmul_peak(
        dtype=precision.compute_dtype(config.dtype))
    self.reset()

  def reset(self):
    self.start, self.steps, self.tokens, self.flops = time.perf_counter(), 0, 0, 0.0

  def add(self, local_batch: dict):
    """Counts one step's real (non-padding) input tokens and analytic FLOPs, all processes."""
    n = jax.process_count()
    self.steps += 1
    self.tokens += n * sum(int(np.count_nonzero(local_batch[k]))
                           for k in ('inputs', 'decoder_inputs') if k in local_batch)
    self.flops += n * perf.train_step_flops(self.config, self.vocab_size, local_batch)

  def summary(self) -> dict:
    elapsed = time.perf_counter() - self.start
    return dict(tokens_per_s=self.tokens / elapsed, step_ms=1000 * elapsed / self.steps,
                mfu=self.flops / elapsed / self.peak_flops)


def train_and_evaluate(config, workdir: str, *, force_unlock: bool = False,
                       allow_config_change=()) -> tuple[TrainState, dict]:
  """Trains to config.num_train_steps updates (resuming from workdir), evaluating and saving.

  The run holds the workdir's lock throughout (force_unlock: take it over) and resumes only with
  the config of the workdir, up to workdir.FREE_FIELDS and the fields in allow_config_change.
  SIGTERM or Ctrl-C: the step in progress finishes and is saved; Ctrl-C then raises
  distributed.Interrupted. A run that reaches num_train_steps then saves the average of its last
  config.average_last_checkpoints checkpoints (Checkpointer.save_average).
  Returns the final state and the last validation metrics.
  """
  with workdir_lib.Lock(workdir, force=force_unlock):
    changes = workdir_lib.config_changes(workdir, config, allow_config_change)
    logging.info('config:\n%s', config)
    exp = Experiment(config)
    train_iter = data.make_train_iterator(config, exp.tokenizer,
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count())
    abstract, shardings = exp.abstract_state()
    with checkpoint.Checkpointer(workdir, config, exp.tokenizer.vocab_size) as ckpt, \
        MetricWriter(workdir) as writer:
      state, start_step = ckpt.restore(abstract, train_iter)  # refuses another model shape
      if state is None:
        state = create_state(exp.model, exp.optimizer, config, exp.eval_batches[0], shardings)
      else:
        logging.info('Resumed from %s at step %d.', ckpt.directory, start_step)
      workdir_lib.record_config(workdir, config, changes, start_step, writer)
      num_params = sum(x.size for x in jax.tree.leaves(state.params))
      logging.info('%s:%s, %s parameters, mesh %s', config.variant, config.size,
                   f'{num_params:,}', dict(exp.mesh.shape))
      state, last_eval = _train_loop(exp, state, start_step, train_iter, shardings, ckpt, writer)
      # Only a finished run: a preempted one would average checkpoints it has yet to write.
      if config.average_last_checkpoints and int(state.step) == config.num_train_steps:
        ckpt.save_average(abstract.params, config.average_last_checkpoints)
      return state, last_eval


def _train_loop(exp, state, start_step, train_iter, shardings, ckpt, writer):
  """Steps from start_step to config.num_train_steps, or to a signal; (state, last validation)."""
  config = exp.config
  step_fn = jit_train_step(exp.model, exp.optimizer, config, exp.mesh, shardings)
  eval_fn = evaluate.jit_eval_step(exp.model, config, exp.mesh, shardings.params)
  throughput = _Throughput(config, exp.tokenizer.vocab_size)
  pending, last_eval, step_memory = [], {}, {}
  with distributed.PreemptionNotice(config.log_every_steps) as preempted:
    for step in range(start_step, config.num_train_steps):
      local_batch = next(train_iter)
      batch = sharding.global_batch(local_batch, exp.mesh)
      distributed.wait_before_launch(state)
      state, metrics = step_fn(state, batch)
      if step == start_step:
        jax.block_until_ready(state)
        logging.info('First step (compilation included) took %.1f s.',
                     time.perf_counter() - throughput.start)
        planned_mib = perf.planned_memory_mib(step_fn, state, batch)
        step_memory = {} if planned_mib is None else {'step_memory_mib': planned_mib}
        throughput.reset()
      else:
        throughput.add(local_batch)
      pending.append(metrics)
      done = step + 1
      is_last = done == config.num_train_steps
      if done % config.log_every_steps == 0 or is_last:
        summary = _summarize_train(pending)
        if throughput.steps:
          summary.update(throughput.summary())
        summary['nonfinite_steps'] = _check_finite(state, config)
        summary.update(step_memory)  # once: the first record of the run
        step_memory = {}
        writer.write(done, summary)
        log_progress(done, config.num_train_steps, summary)
        pending = []
        throughput.reset()
      eval_metrics = None
      if done % config.eval_every_steps == 0 or is_last:
        eval_metrics = evaluate.validation_metrics(exp, eval_fn, state.params)
        writer.write(done, eval_metrics)
        logging.info('eval at step %d: %s', done, _format(eval_metrics))
        last_eval = eval_metrics
      stop = not is_last and preempted.reached(done)
      if stop:
        signal_name = preempted.received or 'SIGTERM'  # None: the coordinator told this process
        logging.warning('%s (%s): saving step %d to %s/%d and exiting; rerun to resume.',
                        'Interrupted' if signal_name == 'SIGINT' else 'Preempted', signal_name,
                        done, ckpt.directory, done)
      if done % config.checkpoint_every_steps == 0 or is_last or eval_metrics or stop:
        _check_finite(state, config)  # never save after a non-finite step under 'stop'
        ckpt.save(done, state, train_iter, metrics=_numeric(eval_metrics))
        throughput.reset()  # evaluation and saving are not training time
      if stop:
        if preempted.received == 'SIGINT':
          raise distributed.Interrupted(f'saved step {done}')  # after the save, as for SIGTERM
        break
  return state, last_eval


def _numeric(metrics):
  if not metrics:
    return None
  return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def _format(metrics: dict) -> str:
  return ', '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
                   for k, v in metrics.items())
