"""Orbax checkpoints of a run: train state, data-iterator state and config, in one step folder.

WORKDIR/checkpoints/<step>/{state,data,config,metrics}. Saves are asynchronous; the latest
`max_checkpoints_to_keep` are kept plus the best by `config.best_metric` (lower is better).
With several processes every process writes its own shards (and data-iterator state) of the same
checkpoint, which orbax commits once all have written.

Crash safety: a step folder appears only once its checkpoint is complete (orbax writes to a
temporary folder and renames it); the leftovers of a save interrupted by kill -9 are temporary
folders, ignored, named in a warning and removed on the next start of training. A state holding
NaN or Inf is never saved. Each checkpoint records a checksum of every array of its state
(state_checksum), computed on the devices from the state being saved and checked after every
restore: a flipped bit that still decodes is caught like a truncated file.
A restart resumes from the newest checkpoint that restores; one that does not (truncated or
corrupted files, a checksum that differs, non-finite values) is skipped with a warning naming it
and, once an older one has restored, moved to WORKDIR/checkpoints_unreadable/ so that the resumed
run can write that step again. If checkpoints exist but none restores, the run stops rather than
start afresh. A checkpoint of a model of another shape is refused, never overwritten.
Using a model reads its parameters alone (`restore_params`, an orbax partial restore), checked
against the same checksums.

Checkpoint averaging (the paper evaluates the mean of its last checkpoints): `average_params` means
the parameters of some steps; `Checkpointer.save_average`, at the end of training, saves the mean of
the latest config.average_last_checkpoints to WORKDIR/checkpoints_averaged/<newest step>/ in the
same layout (state holding {'params'} alone, config naming the steps averaged), which
--checkpoint=averaged loads. It lives beside checkpoints/, never in it: a resumed run restores
only from checkpoints/, so it continues from the trained state, not from the average.
"""

import dataclasses
import os
import time
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers

from transformer import distributed, errors
from transformer.layers import ModelConfig

# Config fields that change parameter shapes: a checkpoint must agree on all of them.
SHAPE_FIELDS = ('variant', 'd_model', 'num_heads', 'num_layers', 'num_decoder_layers', 'd_ff',
                'positional', 'max_len', 'share_embeddings', 'tie_output', 'num_token_types',
                'attention_bias', 'embedding_norm', 'logits_bias', 'num_kv_heads', 'ffn',
                'ffn_bias', 'norm', 'qk_norm', 'relative_buckets', 'embedding_dim',
                'share_layers', 'attention_kind', 'scan_layers')


CHECKPOINTS = 'checkpoints'  # WORKDIR/checkpoints/<step>: the train states of a run
AVERAGED = 'checkpoints_averaged'  # WORKDIR/checkpoints_averaged/<newest step>: averaged parameters

# The name orbax gives the folder of a save in progress: <step>.orbax-checkpoint-tmp-<time>.
UNFINISHED_MARK = '.orbax-checkpoint-tmp'


class ParamsOnly(NamedTuple):
  """Marks an abstract parameter tree to restore alone (Checkpointer.restore_params)."""
  params: Any


class IncompatibleCheckpointError(errors.ConfigError):
  pass


class NonFiniteStateError(FloatingPointError):
  pass


class UnreadableCheckpointsError(errors.UserError, RuntimeError):
  pass


@jax.jit
def _all_finite_leaves(leaves):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def all_finite(tree) -> bool:
  """Whether every floating-point value of `tree` (arrays, possibly sharded) is finite."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return not leaves or bool(_all_finite_leaves(leaves))


def _as_words(x):
  """The bits of x as uint32, one word per element (two for 8-byte dtypes)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  if x.dtype.itemsize >= 4:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _word_checksum(words):
  """(sum of words, sum of words x (2i + 1)) mod 2^32, i the row-major index.

  Exact integer sums: the same whatever the sharding or the order of the reduction, so a state
  restored into another mesh checks against the checksum it was saved with. An odd weight makes
  every single flipped bit change the second sum; two sums leave 2^-64 to chance otherwise.
  """
  strides = [int(np.prod(words.shape[d + 1:])) % 2 ** 32 for d in range(words.ndim)]
  index = jnp.zeros(words.shape, jnp.uint32)
  for d, stride in enumerate(strides):  # broadcasted iotas keep the sharding (no reshape)
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, d) * jnp.uint32(stride)
  return jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                    jnp.sum(words * (2 * index + 1), dtype=jnp.uint32)])


@jax.jit
def _leaf_checksums(leaves):
  return jnp.stack([_word_checksum(_as_words(x)) for x in leaves])


def state_checksum(state) -> dict[str, str]:
  """{leaf path: 16 hex digits} of the exact bits of every array of `state` (a collective: all
  processes must call it; computed where the arrays live, only the digits reach the host)."""
  paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(state)[0])
  sums = np.asarray(jax.device_get(_leaf_checksums(list(leaves))))
  return {jax.tree_util.keystr(path, simple=True, separator='/'): f'{a:08x}{b:08x}'
          for path, (a, b) in zip(paths, sums)}


def committed_steps(workdir: str, folder: str = CHECKPOINTS) -> list[int]:
  """The steps of WORKDIR/checkpoints (or of another folder), from the folder names alone: for
  deciding, before any Checkpointer exists (it creates and cleans up that folder), whether a run
  resumes, or which checkpoints there are to compare."""
  folder = epath.Path(workdir) / folder
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def _short(error: Exception, limit: int = 300) -> str:
  text = f'{type(error).__name__}: {error}'
  return text if len(text) <= limit else text[:limit] + '...'


class Checkpointer:
  """Saves and restores {state, data iterator, config} for one workdir.

  read_only: for using a model (eval, translate, ...), perhaps while it trains: creates nothing,
  removes no unfinished save (it may be the training run's) and moves no unreadable checkpoint.
  folder: WORKDIR/checkpoints, or AVERAGED for the parameters that save_average writes.
  Close it (or use it as a context manager) before the program ends: orbax's background threads
  otherwise outlive the interpreter and fail noisily.
  """

  def __init__(self, workdir: str, config, vocab_size: int, read_only: bool = False,
               folder: str = CHECKPOINTS):
    workdir = os.fspath(workdir)
    if '://' not in workdir:  # gs://... and other URLs are used as they are
      workdir = os.path.abspath(workdir)
    self.workdir, self.config = workdir, config
    self.directory = os.path.join(workdir, folder)
    self.read_only = read_only
    self.config_json = dict(config.to_dict(), model_vocab_size=vocab_size)
    self.best_metric = best_metric = config.best_metric
    value = lambda m: m.get(best_metric, float('inf')) if m else float('inf')
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(config.max_checkpoints_to_keep),
        checkpoint_managers.BestN(get_metric_fn=lambda m: -value(m), n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    if not read_only:
      _announce_unfinished_saves(self.directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        # best_fn makes orbax write each step's metrics, so the best step survives restarts.
        options=ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=value,
                                             best_mode='min', create=not read_only,
                                             enable_async_checkpointing=True,
                                             cleanup_tmp_directories=not read_only),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler(),
                       'config': ocp.JsonCheckpointHandler()})

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def best_step(self) -> int | None:
    """The kept step with the lowest config.best_metric, or None if no checkpoint has it."""
    scored = []
    for step in self.all_steps():
      try:
        value = (self.manager.metrics(step) or {}).get(self.best_metric)
      except Exception:  # pylint: disable=broad-except  # unreadable metrics: not a candidate
        value = None
      if isinstance(value, (int, float)):
        scored.append((value, step))
    return min(scored)[1] if scored else None

  def check_compatible(self, step: int) -> dict:
    """The config saved with checkpoint `step`; raises IncompatibleCheckpointError if it holds a
    differently shaped model."""
    saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    saved = saved['config']
    # A field newer than the checkpoint had its default then.
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    shape = {f: saved.get(f, defaults.get(f)) for f in SHAPE_FIELDS + ('model_vocab_size',)}
    diff = {f: (shape[f], self.config_json.get(f)) for f in shape
            if shape[f] != self.config_json.get(f)}
    if diff:
      lines = ', '.join(f'{f}: checkpoint {a!r} vs config {b!r}' for f, (a, b) in diff.items())
      raise IncompatibleCheckpointError(
          f'{self.directory}/{step} holds a model of another shape ({lines}). It is left '
          'untouched: use another --workdir, or the config it was trained with.')
    return saved

  def save(self, step: int, state, data_iterator, metrics: dict | None = None,
           info: dict | None = None) -> bool:
    """Starts an asynchronous save of `step`; False if orbax skips it (a newer step exists).

    data_iterator None saves no data position (a converted model): training from that
    checkpoint reads its data from the start. info: recorded with the saved config (e.g. the
    steps an average was made of).
    Raises NonFiniteStateError (and writes nothing) if the state holds NaN or Inf.
    """
    if not all_finite(state):
      raise NonFiniteStateError(
          f'Refusing to save step {step} to {self.directory}: the train state holds NaN or Inf. '
          'Earlier checkpoints are kept.')
    config = dict(self.config_json, has_data_state=data_iterator is not None,
                  state_checksum=state_checksum(state), **(info or {}))
    items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config))
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self.manager.save(step, metrics=metrics or {}, args=ocp.args.Composite(**items))
    if not saved:
      logging.warning('Checkpoint step %d was not saved: %s already holds step %s.', step,
                      self.directory, self.manager.latest_step())
    return saved

  def _restore_step(self, step: int, abstract_state, data_iterator):
    """(state, the config saved with it); abstract_state ParamsOnly(abstract params) reads the
    parameters alone, as {'params': params}."""
    saved_config = self.check_compatible(step)
    if isinstance(abstract_state, ParamsOnly):
      # A partial restore: the optimizer's moments (twice the parameters under Adam) stay on disk.
      tree = {'params': abstract_state.params}
      args = ocp.args.PyTreeRestore(item=tree, partial_restore=True,
                                    restore_args=ocp.checkpoint_utils.construct_restore_args(tree))
      with ocp.PyTreeCheckpointer() as reader:
        return reader.restore(epath.Path(self.directory) / str(step) / 'state',
                              args=args), saved_config
    target = self._saved_fields(step, abstract_state)
    items = dict(state=ocp.args.StandardRestore(target))
    if data_iterator is not None and saved_config.get('has_data_state', True):
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    state = self.manager.restore(step, args=ocp.args.Composite(**items))['state']
    if target is not abstract_state:
      state = abstract_state.replace(**state)
    return state, saved_config

  def _saved_fields(self, step: int, abstract_state):
    """abstract_state, or, for a checkpoint saved before a train-state field that holds no
    arrays in this run (TrainState.memory without a Transformer-XL memory), a dict of the fields
    it has: it then restores with that field empty."""
    with ocp.StandardCheckpointer() as reader:
      saved = set(reader.metadata(epath.Path(self.directory) / str(step) / 'state')
                  .item_metadata.keys())
    fields = [f.name for f in dataclasses.fields(abstract_state)]
    missing = [f for f in fields if f not in saved]
    if not missing or any(jax.tree.leaves(getattr(abstract_state, f)) for f in missing):
      return abstract_state  # (a field with arrays missing fails to restore, with a message)
    return {f: getattr(abstract_state, f) for f in fields if f in saved}

  @staticmethod
  def _distrust(state, saved_config: dict) -> str | None:
    """Why a restored state cannot be used (NaN or Inf, a checksum that differs), or None.

    A collective: every process calls it and gets the same answer.
    """
    if not all_finite(state):
      return 'the train state holds NaN or Inf'
    expected = saved_config.get('state_checksum')  # None: saved before checksums were written
    if expected is None:
      return None
    differ = [k for k, v in state_checksum(state).items() if expected.get(k) != v]
    if differ:
      return (f'checksum mismatch in {len(differ)} array(s) ({", ".join(differ[:3])}'
              f'{", ..." if len(differ) > 3 else ""}): its files changed after they were written')
    return None

  def restore_params(self, abstract_params, step: int | None = None):
    """(params, step): the parameters alone of `step` or of the newest checkpoint that restores,
    checked against their checksums like a whole state; (None, 0) if there is no checkpoint.
    Reads no optimizer state and no data position: for using a model, not for resuming it."""
    tree, step = self.restore(ParamsOnly(abstract_params), step=step)
    return (tree['params'] if tree is not None else None), step

  def restore(self, abstract_state, data_iterator=None, step: int | None = None):
    """(state, step) from `step`, or from the newest checkpoint that restores; (None, 0) if none.

    abstract_state: a tree of jax.ShapeDtypeStruct with shardings, the layout to restore into.
    data_iterator: restored in place when given.
    A checkpoint that fails to restore on any process is skipped by all of them, with a warning
    naming it; UnreadableCheckpointsError if checkpoints exist but none restores.
    """
    if step is not None:
      state, saved_config = self._restore_step(step, abstract_state, data_iterator)
      problem = self._distrust(state, saved_config)
      if problem:
        raise UnreadableCheckpointsError(f'{self.directory}/{step} cannot be used: {problem}.')
      return state, step
    unreadable = []
    for candidate in self.all_steps()[::-1]:
      try:
        (state, saved_config), error = self._restore_step(candidate, abstract_state,
                                                          data_iterator), None
      except IncompatibleCheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        state, error = None, _short(e)
      # Every process takes the same decision (all_processes and _distrust are collectives).
      restored_everywhere = distributed.all_processes(error is None)
      if restored_everywhere:
        error = self._distrust(state, saved_config)
        restored_everywhere = error is None
      if not restored_everywhere:
        error = error or 'it could not be restored on another process'
        logging.warning('Checkpoint %s/%d could not be restored (%s); falling back to the '
                        'previous one.', self.directory, candidate, error)
        unreadable.append((candidate, error))
        continue
      if unreadable:
        self._set_aside([s for s, _ in unreadable], candidate)
      return state, candidate
    if unreadable:
      details = '; '.join(f'{s}: {e}' for s, e in unreadable)
      raise UnreadableCheckpointsError(
          f'None of the checkpoints in {self.directory} could be restored ({details}). Nothing '
          'was changed: move that folder away to start afresh.')
    return None, 0

  def _set_aside(self, steps: list[int], resumed: int):
    """Moves unreadable step folders to WORKDIR/checkpoints_unreadable/, so the resumed run can
    save those steps again (orbax skips a step it already lists); read-only, only names them."""
    if self.read_only:
      logging.warning('Using %s/%d instead of the newer unreadable checkpoint(s) %s.',
                      self.directory, resumed, ', '.join(map(str, steps)))
      return
    parent = epath.Path(self.directory).parent / 'checkpoints_unreadable'
    moved = []
    for s in steps:
      target = parent / f'{s}-{time.strftime("%Y%m%d-%H%M%S")}'
      moved.append(f'{self.directory}/{s} -> {target}')
      if jax.process_index() == 0:
        parent.mkdir(parents=True, exist_ok=True)
        (epath.Path(self.directory) / str(s)).rename(target)
    distributed.barrier('checkpoint_set_aside')
    self.manager.reload()
    logging.warning('Resumed from %s/%d instead of the newer unreadable checkpoint(s) %s; moved '
                    'them aside: %s.', self.directory, resumed, ', '.join(map(str, steps)),
                    '; '.join(moved))

  def save_average(self, abstract_params, count: int) -> list[int]:
    """Saves the mean of the parameters of the latest `count` checkpoints (once pending saves are
    committed) to WORKDIR/checkpoints_averaged/<newest step>; returns the steps averaged, [] if
    fewer than two exist. A collective: every process calls it and writes its own shards.
    """
    self.wait()
    steps = self.all_steps()[-count:]  # the best step is kept too, but is never newer
    if len(steps) < 2:
      logging.warning('Not averaging checkpoints: %s holds %s, fewer than two.', self.directory,
                      steps)
      return []
    if len(steps) < count:
      logging.warning('Averaging the %d checkpoints of %s, fewer than the %d asked for.',
                      len(steps), self.directory, count)
    vocab_size = self.config_json['model_vocab_size']
    with Checkpointer(self.workdir, self.config, vocab_size, folder=AVERAGED) as out:
      if steps[-1] in out.all_steps():
        if out.check_compatible(steps[-1]).get('averaged_steps') == steps:
          logging.info('%s/%d already holds the average of steps %s.', out.directory, steps[-1],
                       steps)
          return steps
        out.manager.delete(steps[-1])  # an average of other steps (the count changed)
      params, steps = average_params(self, abstract_params, steps)
      out.save(steps[-1], {'params': params}, None, info=dict(averaged_steps=steps))
    logging.info('Saved the mean of the parameters of steps %s to %s/%d (--checkpoint=averaged).',
                 ', '.join(map(str, steps)), out.directory, steps[-1])
    return steps

  def wait(self):
    """Blocks until pending asynchronous saves are committed."""
    self.manager.wait_until_finished()

  def close(self):
    """Waits for pending saves, then stops orbax's background threads."""
    self.manager.close()


def average_params(ckpt: Checkpointer, abstract_params, steps: list[int | None]):
  """(the elementwise mean of the parameters of `steps` of ckpt, the steps read; None: the newest
  that restores). Read one at a time and summed: memory holds two sets of parameters, whatever
  the number of steps."""
  total, read = None, []
  for step in steps:
    params, step = ckpt.restore_params(abstract_params, step=step)
    total = params if total is None else jax.tree.map(jnp.add, total, params)
    read.append(step)
  return jax.tree.map(lambda p: p / len(read), total), read


def _announce_unfinished_saves(directory: str):
  """Names the folders of saves that never finished (kill -9, a crash, a full disk), which orbax
  removes as the CheckpointManager starts (cleanup_tmp_directories)."""
  folder = epath.Path(directory)
  if not folder.is_dir() or jax.process_index() != 0:
    return
  unfinished = sorted(p.name for p in folder.iterdir() if UNFINISHED_MARK in p.name)
  if unfinished:
    logging.warning('Removing %d unfinished checkpoint folder(s) that an interrupted save left in '
                    '%s: %s.', len(unfinished), directory, ', '.join(unfinished))
