"""The training loop end to end on real text: resume, refusal of bad input, non-finite loss."""

import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import run_helpers
from transformer import checkpoint, train

pytestmark = run_helpers.needs_corpus


@pytest.fixture(scope='module')
def data_dir():
  return run_helpers.prepared_data_dir()


def loop_config(data_dir, **overrides):
  """original:tiny on a small parallel corpus: multi30k val as train, test_2016 as validation."""
  return run_helpers.make_config(data_dir, **overrides)


def record_train_batches(monkeypatch) -> list:
  """Makes every train step also append a digest of its batch to the returned list."""
  seen = []
  make = train.jit_train_step

  def recording_jit_train_step(*args, **kwargs):
    step = make(*args, **kwargs)

    def recorded(state, batch):
      seen.append(hashlib.sha1(b''.join(np.asarray(batch[k]).tobytes()
                                        for k in sorted(batch))).hexdigest())
      return step(state, batch)
    recorded.lower = step.lower  # for the step's memory, read from its compilation
    return recorded

  monkeypatch.setattr(train, 'jit_train_step', recording_jit_train_step)
  return seen


def test_resume_is_exact(data_dir, tmp_path, monkeypatch):
  seen = record_train_batches(monkeypatch)
  straight, _ = train.train_and_evaluate(loop_config(data_dir, num_train_steps=6),
                                         str(tmp_path / 'straight'))
  straight_batches = list(seen)
  seen.clear()
  train.train_and_evaluate(loop_config(data_dir, num_train_steps=3), str(tmp_path / 'resumed'))
  resumed, _ = train.train_and_evaluate(loop_config(data_dir, num_train_steps=6),
                                        str(tmp_path / 'resumed'))
  assert len(straight_batches) == 6 and seen == straight_batches
  assert int(resumed.step) == 6
  # Each run (one, then two) logged the memory its compiled step planned, once.
  for name, runs in (('straight', 1), ('resumed', 2)):
    with open(tmp_path / name / 'metrics.jsonl', encoding='utf-8') as f:
      planned = [r['step_memory_mib'] for r in map(json.loads, f) if 'step_memory_mib' in r]
    assert len(planned) == runs and all(mib > 0.1 for mib in planned)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               resumed.params, straight.params)


def tree_digest(folder):
  digest = hashlib.sha1()
  for root, _, files in sorted(os.walk(folder)):
    for name in sorted(files):
      with open(os.path.join(root, name), 'rb') as f:
        digest.update(name.encode() + f.read())
  return digest.hexdigest()


def test_checkpoint_of_another_shape_is_refused_and_kept(data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(loop_config(data_dir, num_train_steps=2), workdir)
  before = tree_digest(os.path.join(workdir, 'checkpoints'))
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match='d_model: checkpoint 32'):
    train.train_and_evaluate(loop_config(data_dir, num_train_steps=4, d_model=64), workdir)
  assert tree_digest(os.path.join(workdir, 'checkpoints')) == before


def test_nonfinite_loss_stops_with_a_clear_message(data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  config = loop_config(data_dir, num_train_steps=6, log_every_steps=1, checkpoint_every_steps=1,
                       schedule='constant', learning_rate=1e30, warmup_steps=1,
                       grad_clip_norm=0.0)
  with pytest.raises(train.NonFiniteLossError, match='Non-finite loss or gradient at step'):
    train.train_and_evaluate(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, config, 1)
  for step in ckpt.all_steps():  # whatever was saved before the failure is finite
    assert step < 6


def test_unknown_config_field_fails_before_anything_is_written(tmp_path):
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, '-m', 'launch.main', '--config=configs/original.py:tiny',
       f'--workdir={workdir}', '--config.no_such_field=1'],
      cwd=run_helpers.ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert 'no_such_field' in result.stderr
  assert not workdir.exists()
