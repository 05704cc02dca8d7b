"""Orbax checkpoints of a run: train state, data-iterator state and config, in one step folder.

WORKDIR/checkpoints/<step>/{state,data,config,metrics}. Saves are asynchronous; the latest
`max_checkpoints_to_keep` are kept plus the best by `config.best_metric` (lower is better).
With several processes every process writes its own shards (and data-iterator state) of the same
checkpoint, which orbax commits once all have written.

Crash safety: a step folder appears only once its checkpoint is complete (orbax writes to a
temporary folder and renames it); the leftovers of a save interrupted by kill -9 are temporary
folders, ignored and cleaned up on the next start. A state holding NaN or Inf is never saved.
A restart resumes from the newest checkpoint that restores; one that does not (truncated or
corrupted files, non-finite values) is skipped with a warning naming it and, once an older one
has restored, moved to WORKDIR/checkpoints_unreadable/ so that the resumed run can write that step
again. If checkpoints exist but none restores, the run stops rather than start afresh.
A checkpoint of a model of another shape is refused, never overwritten.
"""

import dataclasses
import os
import time

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers

from transformer import distributed
from transformer.layers import ModelConfig

# Config fields that change parameter shapes: a checkpoint must agree on all of them.
SHAPE_FIELDS = ('variant', 'd_model', 'num_heads', 'num_layers', 'num_decoder_layers', 'd_ff',
                'positional', 'max_len', 'share_embeddings', 'tie_output', 'num_token_types',
                'attention_bias', 'embedding_norm', 'logits_bias')


class IncompatibleCheckpointError(ValueError):
  pass


class NonFiniteStateError(FloatingPointError):
  pass


class UnreadableCheckpointsError(RuntimeError):
  pass


@jax.jit
def _all_finite_leaves(leaves):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def all_finite(tree) -> bool:
  """Whether every floating-point value of `tree` (arrays, possibly sharded) is finite."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return not leaves or bool(_all_finite_leaves(leaves))


def _short(error: Exception, limit: int = 300) -> str:
  text = f'{type(error).__name__}: {error}'
  return text if len(text) <= limit else text[:limit] + '...'


class Checkpointer:
  """Saves and restores {state, data iterator, config} for one workdir."""

  def __init__(self, workdir: str, config, vocab_size: int):
    workdir = os.fspath(workdir)
    if '://' not in workdir:  # gs://... and other URLs are used as they are
      workdir = os.path.abspath(workdir)
    self.directory = os.path.join(workdir, 'checkpoints')
    self.config_json = dict(config.to_dict(), model_vocab_size=vocab_size)
    self.best_metric = best_metric = config.best_metric
    value = lambda m: m.get(best_metric, float('inf')) if m else float('inf')
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(config.max_checkpoints_to_keep),
        checkpoint_managers.BestN(get_metric_fn=lambda m: -value(m), n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    self.manager = ocp.CheckpointManager(
        self.directory,
        # best_fn makes orbax write each step's metrics, so the best step survives restarts.
        options=ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=value,
                                             best_mode='min', create=True,
                                             enable_async_checkpointing=True,
                                             cleanup_tmp_directories=True),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler(),
                       'config': ocp.JsonCheckpointHandler()})

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

  def save(self, step: int, state, data_iterator, metrics: dict | None = None) -> bool:
    """Starts an asynchronous save of `step`; False if orbax skips it (a newer step exists).

    data_iterator None saves no data position (a converted model): training from that
    checkpoint reads its data from the start.
    Raises NonFiniteStateError (and writes nothing) if the state holds NaN or Inf.
    """
    if not all_finite(state):
      raise NonFiniteStateError(
          f'Refusing to save step {step} to {self.directory}: the train state holds NaN or Inf. '
          'Earlier checkpoints are kept.')
    config = dict(self.config_json, has_data_state=data_iterator is not None)
    items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config))
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self.manager.save(step, metrics=metrics or {}, args=ocp.args.Composite(**items))
    if not saved:
      logging.warning('Checkpoint step %d was not saved: %s already holds step %s.', step,
                      self.directory, self.manager.latest_step())
    return saved

  def _restore_step(self, step: int, abstract_state, data_iterator):
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    saved_config = self.check_compatible(step)
    if data_iterator is not None and saved_config.get('has_data_state', True):
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
    return self.manager.restore(step, args=ocp.args.Composite(**items))['state']

  def restore(self, abstract_state, data_iterator=None, step: int | None = None):
    """(state, step) from `step`, or from the newest checkpoint that restores; (None, 0) if none.

    abstract_state: a tree of jax.ShapeDtypeStruct with shardings, the layout to restore into.
    data_iterator: restored in place when given.
    A checkpoint that fails to restore on any process is skipped by all of them, with a warning
    naming it; UnreadableCheckpointsError if checkpoints exist but none restores.
    """
    if step is not None:
      state = self._restore_step(step, abstract_state, data_iterator)
      if not all_finite(state):
        raise NonFiniteStateError(f'{self.directory}/{step} holds NaN or Inf.')
      return state, step
    unreadable = []
    for candidate in self.all_steps()[::-1]:
      try:
        state, error = self._restore_step(candidate, abstract_state, data_iterator), None
      except IncompatibleCheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        state, error = None, _short(e)
      # Every process takes the same decision (all_processes and all_finite are collectives).
      restored_everywhere = distributed.all_processes(error is None)
      if restored_everywhere and not all_finite(state):
        restored_everywhere, error = False, 'the train state holds NaN or Inf'
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
    save those steps again (orbax skips a step it already lists)."""
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

  def wait(self):
    """Blocks until pending asynchronous saves are committed."""
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
