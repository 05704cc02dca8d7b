"""Orbax checkpoints of a run: train state, data-iterator state and config, in one step folder.

WORKDIR/checkpoints/<step>/{state,data,config}. Saves are asynchronous; the latest
`max_checkpoints_to_keep` are kept plus the best by `config.best_metric` (lower is better).
A restart resumes from the newest checkpoint that restores; one that fails to restore (a partial
or corrupted write) is skipped with a warning naming it. A checkpoint of a model of another shape
is refused, never overwritten.
"""

import os

import grain
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

# Config fields that change parameter shapes: a checkpoint must agree on all of them.
SHAPE_FIELDS = ('variant', 'd_model', 'num_heads', 'num_layers', 'num_decoder_layers', 'd_ff',
                'positional', 'max_len', 'share_embeddings', 'tie_output', 'num_token_types')


class IncompatibleCheckpointError(ValueError):
  pass


class Checkpointer:
  """Saves and restores {state, data iterator, config} for one workdir."""

  def __init__(self, workdir: str, config, vocab_size: int):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.config_json = dict(config.to_dict(), model_vocab_size=vocab_size)
    best_metric = config.best_metric
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(config.max_checkpoints_to_keep),
        checkpoint_managers.BestN(get_metric_fn=lambda m: -m[best_metric], n=1,
                                  keep_checkpoints_without_metrics=False),
    ])
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(preservation_policy=policy, create=True,
                                             enable_async_checkpointing=True),
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler(),
                       'config': ocp.JsonCheckpointHandler()})

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def check_compatible(self, step: int):
    """Raises IncompatibleCheckpointError if checkpoint `step` holds a differently shaped model."""
    saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    saved = saved['config']
    fields = SHAPE_FIELDS + ('model_vocab_size',)
    diff = {f: (saved.get(f), self.config_json.get(f)) for f in fields
            if saved.get(f) != self.config_json.get(f)}
    if diff:
      lines = ', '.join(f'{f}: checkpoint {a!r} vs config {b!r}' for f, (a, b) in diff.items())
      raise IncompatibleCheckpointError(
          f'{self.directory}/{step} holds a model of another shape ({lines}). It is left '
          'untouched: use another --workdir, or the config it was trained with.')

  def save(self, step: int, state, data_iterator, metrics: dict | None = None):
    self.manager.save(step, metrics=metrics, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(self.config_json)))

  def restore(self, abstract_state, data_iterator=None, step: int | None = None):
    """(state, step) from `step`, or from the newest checkpoint that restores; (None, 0) if none.

    abstract_state: a tree of jax.ShapeDtypeStruct with shardings, the layout to restore into.
    data_iterator: restored in place when given.
    """
    steps = [step] if step is not None else self.all_steps()[::-1]
    for candidate in steps:
      items = dict(state=ocp.args.StandardRestore(abstract_state))
      if data_iterator is not None:
        items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        self.check_compatible(candidate)
        restored = self.manager.restore(candidate, args=ocp.args.Composite(**items))
      except IncompatibleCheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        if step is not None:
          raise
        logging.warning('Checkpoint %s/%d could not be restored (%s: %s); falling back to the '
                        'previous one.', self.directory, candidate, type(e).__name__, e)
        continue
      return restored['state'], candidate
    return None, 0

  def wait(self):
    """Blocks until pending asynchronous saves are committed."""
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
