"""Preemption, crashes and bad checkpoints: a run always resumes to the same parameters.

- SIGTERM: the step in progress finishes, a checkpoint is saved at it, the process exits 0.
- kill -9 at any moment (here: during a checkpoint write when caught) leaves the last committed
  checkpoint readable; the restart resumes from it.
- A truncated or corrupted latest checkpoint is skipped with a warning naming it, the previous
  one is used and the bad one moved aside; if none restores the run stops, changing nothing.
- A train state holding NaN is never written.
"""

import dataclasses
import glob
import json
import logging
import os
import re
import shutil
import signal

import jax
import jax.numpy as jnp
import pytest

from tests import run_helpers as rh
from transformer import checkpoint, data, train

pytestmark = [
    rh.needs_corpus,
    # A failed restore leaves orbax's pending reads to complete after its event loop closed:
    # "Event loop is closed" noise, nothing more.
    pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning'),
]
NUM_STEPS = 8


def config_for(**extra):
  return rh.make_config(rh.prepared_data_dir(), num_train_steps=NUM_STEPS, **extra)


@pytest.fixture(scope='module')
def reference(tmp_path_factory) -> str:
  """An uninterrupted run with checkpoints every 2 steps: the parameters a run must reach."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  train.train_and_evaluate(config_for(checkpoint_every_steps=2, eval_every_steps=2,
                                      max_checkpoints_to_keep=100), workdir)
  assert rh.committed_steps(workdir) == [2, 4, 6, 8]
  return workdir


def reference_params(reference_dir: str, step: int):
  return rh.restore_state(reference_dir, config_for(), step).params


def test_sigterm_then_kill9_then_restart_equals_uninterrupted(reference, tmp_path, caplog):
  workdir = str(tmp_path / 'run')
  checkpoints = os.path.join(workdir, 'checkpoints')

  # SIGTERM once training runs: the current step finishes, is saved, and the process exits 0.
  log = tmp_path / 'sigterm.log'
  proc = rh.start(rh.main_command(workdir, rh.prepared_data_dir(), num_train_steps=NUM_STEPS,
                                  checkpoint_every_steps=100), log)
  rh.wait_for(rh.log_contains(log, f'step 2/{NUM_STEPS}'), [proc], 'step 2 in the log')
  rh.send(proc, signal.SIGTERM)
  assert rh.wait_all([proc]) == [0], rh.read(log)[-3000:]
  stopped = re.findall(r'Preempted \(SIGTERM\): saving step (\d+)', rh.read(log))
  assert len(stopped) == 1, rh.read(log)[-3000:]
  stop = int(stopped[0])
  assert 2 <= stop < NUM_STEPS and rh.committed_steps(workdir) == [stop]

  # The restart resumes there; kill -9 while it writes a checkpoint (or after two more).
  log = tmp_path / 'kill9.log'
  proc = rh.start(rh.main_command(workdir, rh.prepared_data_dir(), num_train_steps=NUM_STEPS,
                                  checkpoint_every_steps=1), log)
  writing = lambda: any('tmp' in name for name in os.listdir(checkpoints))
  rh.wait_for(lambda: writing() or len(rh.committed_steps(workdir)) >= 3, [proc],
              'a checkpoint write after the restart', interval=0.002)
  rh.send(proc, signal.SIGKILL)
  assert rh.wait_all([proc]) == [-signal.SIGKILL]
  print('killed', 'during a checkpoint write' if writing() else 'between checkpoints',
        sorted(os.listdir(checkpoints)))
  assert f'Resumed from {checkpoints} at step {stop}.' in rh.read(log)
  last = rh.committed_steps(workdir)[-1]
  assert stop <= last < NUM_STEPS

  # The last restart (in this process) resumes from the last committed checkpoint and ends with
  # exactly the parameters of the uninterrupted run.
  with caplog.at_level(logging.INFO):
    state, _ = train.train_and_evaluate(config_for(checkpoint_every_steps=1), workdir)
  assert f'Resumed from {checkpoints} at step {last}.' in caplog.text
  assert 'could not be restored' not in caplog.text
  assert int(state.step) == NUM_STEPS
  assert not [n for n in os.listdir(checkpoints) if 'tmp' in n]  # leftovers cleaned up
  rh.assert_trees_equal(state.params, reference_params(reference, NUM_STEPS))


def copy_checkpoints(reference_dir: str, workdir: str, steps):
  for step in steps:
    shutil.copytree(os.path.join(reference_dir, 'checkpoints', str(step)),
                    os.path.join(workdir, 'checkpoints', str(step)))


def corrupt(step_dir: str, how: str):
  state = os.path.join(step_dir, 'state')
  if how == 'truncated':  # e.g. a disk that filled up, or a copy cut short
    for path in glob.glob(os.path.join(state, '**', 'd', '*'), recursive=True):
      os.truncate(path, os.path.getsize(path) // 2)
  elif how == 'garbage':  # overwritten bytes
    for path in glob.glob(os.path.join(state, '**', 'd', '*'), recursive=True):
      with open(path, 'r+b') as f:
        f.seek(os.path.getsize(path) // 3)
        f.write(b'\xde\xad\xbe\xef' * 16)
  elif how == 'metadata':
    with open(os.path.join(state, '_METADATA'), 'w', encoding='utf-8') as f:
      f.write('{"tree_metadata": {')
  else:
    raise ValueError(how)


def test_corrupted_latest_checkpoint_falls_back_to_previous(reference, tmp_path, caplog):
  workdir = str(tmp_path / 'run')
  checkpoints = os.path.join(workdir, 'checkpoints')
  copy_checkpoints(reference, workdir, [4, 6])
  corrupt(os.path.join(checkpoints, '6'), 'truncated')
  with caplog.at_level(logging.WARNING):
    state, _ = train.train_and_evaluate(config_for(checkpoint_every_steps=2), workdir)
  assert f'Checkpoint {checkpoints}/6 could not be restored' in caplog.text
  assert (f'Resumed from {checkpoints}/4 instead of the newer unreadable checkpoint(s) 6'
          in caplog.text)
  assert len(os.listdir(os.path.join(workdir, 'checkpoints_unreadable'))) == 1  # kept, aside
  assert rh.committed_steps(workdir) == [4, 6, 8]  # step 6 written again
  rh.assert_trees_equal(state.params, reference_params(reference, NUM_STEPS))


@pytest.fixture(scope='module')
def experiment():
  return train.Experiment(config_for())


@pytest.mark.parametrize('how', ['garbage', 'metadata'])
def test_corruption_is_detected_on_restore(reference, experiment, tmp_path, caplog, how):
  workdir = str(tmp_path / 'run')
  checkpoints = os.path.join(workdir, 'checkpoints')
  copy_checkpoints(reference, workdir, [2, 4, 6])
  corrupt(os.path.join(checkpoints, '6'), how)
  corrupt(os.path.join(checkpoints, '4'), 'truncated')
  ckpt = checkpoint.Checkpointer(workdir, experiment.config, experiment.tokenizer.vocab_size)
  with caplog.at_level(logging.WARNING):
    state, step = ckpt.restore(experiment.abstract_state()[0])
  ckpt.close()
  assert step == 2
  for bad in (6, 4):
    assert f'Checkpoint {checkpoints}/{bad} could not be restored' in caplog.text
  assert 'unreadable checkpoint(s) 6, 4; moved them aside' in caplog.text
  assert rh.committed_steps(workdir) == [2]
  rh.assert_trees_equal(state.params, reference_params(reference, 2))


def test_no_readable_checkpoint_stops_and_changes_nothing(reference, tmp_path):
  workdir = str(tmp_path / 'run')
  copy_checkpoints(reference, workdir, [2, 4])
  for step in (2, 4):
    corrupt(os.path.join(workdir, 'checkpoints', str(step)), 'metadata')
  with pytest.raises(checkpoint.UnreadableCheckpointsError, match=r'None of the checkpoints .*4: '):
    train.train_and_evaluate(config_for(), workdir)
  assert rh.committed_steps(workdir) == [2, 4]
  assert not os.path.exists(os.path.join(workdir, 'checkpoints_unreadable'))


def test_state_with_nan_is_never_written(reference, tmp_path):
  config = config_for()
  state = rh.restore_state(reference, config, 2)
  leaves, treedef = jax.tree.flatten(state.params)
  leaves[0] = leaves[0] * jnp.nan
  bad = state.replace(params=jax.tree.unflatten(treedef, leaves))
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'run'), config, 1)
  with pytest.raises(checkpoint.NonFiniteStateError, match='Refusing to save step 3'):
    ckpt.save(3, bad, data_iterator=None)
  ckpt.wait()
  ckpt.close()
  assert rh.committed_steps(str(tmp_path / 'run')) == []


def test_a_checkpoint_saved_before_the_memory_field_still_restores(reference, tmp_path):
  """Train states saved before TrainState.memory (Transformer-XL) existed lack that field: a run
  without a memory restores them, parameters and all."""
  config = config_for()
  state = rh.restore_state(reference, config, 2)
  before = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
            if f.name != 'memory'}
  workdir = str(tmp_path / 'run')
  ckpt = checkpoint.Checkpointer(workdir, config, data.get_tokenizer(config).vocab_size)
  ckpt.save(2, before, data_iterator=None)
  ckpt.wait()
  ckpt.close()
  restored = rh.restore_state(workdir, config, 2)
  assert restored.memory == {}
  rh.assert_trees_equal(restored.params, state.params)
  rh.assert_trees_equal(restored.opt_state, state.opt_state)


def test_best_step_survives_a_restart(reference):
  with open(os.path.join(reference, 'metrics.jsonl'), encoding='utf-8') as f:
    evals = [json.loads(line) for line in f if 'eval_loss' in line]
  best = min(evals, key=lambda r: r['eval_loss'])['step']
  assert [r['step'] for r in evals] == [2, 4, 6, 8]
  ckpt = checkpoint.Checkpointer(reference, config_for(), 1)  # a new process's view
  assert ckpt.best_step() == best
  ckpt.close()


def test_checkpoint_holding_nan_is_skipped_on_restore(reference, experiment, tmp_path,
                                                      monkeypatch, caplog):
  workdir = str(tmp_path / 'run')
  checkpoints = os.path.join(workdir, 'checkpoints')
  copy_checkpoints(reference, workdir, [2, 4])
  state = rh.restore_state(reference, experiment.config, 4)
  leaves, treedef = jax.tree.flatten(state.params)
  bad = state.replace(params=jax.tree.unflatten(treedef, [leaves[0] * jnp.nan] + leaves[1:]))
  ckpt = checkpoint.Checkpointer(workdir, experiment.config, experiment.tokenizer.vocab_size)
  with monkeypatch.context() as patch:  # written by something that did not check (not us)
    patch.setattr(checkpoint, 'all_finite', lambda tree: True)
    ckpt.save(6, bad, data.make_train_iterator(experiment.config, experiment.tokenizer))
    ckpt.wait()
  assert rh.committed_steps(workdir) == [2, 4, 6]
  with caplog.at_level(logging.WARNING):
    restored, step = ckpt.restore(experiment.abstract_state()[0])
  ckpt.close()
  assert step == 4
  assert (f'Checkpoint {checkpoints}/6 could not be restored (the train state holds NaN or Inf)'
          in caplog.text)
  rh.assert_trees_equal(restored.params, state.params)
