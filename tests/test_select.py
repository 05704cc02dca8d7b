"""Checkpoint averaging at the end of training, and --mode=select: the average is the mean of the
last N checkpoints and never what training resumes from; select reads the validation split alone,
scores every point of its grid and records the best, which eval and translate then use unless the
command line says otherwise.
"""

import contextlib
import io
import json
import os
import shutil
import subprocess

import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests import run_helpers as rh
from transformer import checkpoint, config_checks, data, errors, inference, selection, train

pytestmark = [
    rh.needs_corpus,
    # The raw reads below take the shardings from the files, as a reader without the model would.
    pytest.mark.filterwarnings('ignore:Sharding info not provided'),
]
TRAINED = dict(num_train_steps=3, checkpoint_every_steps=1, max_checkpoints_to_keep=3,
               average_last_checkpoints=2, decode_max_len=8)
SENTENCES, BATCHES = 16, 2  # of the validation split, read by select here: a tiny model's grid


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(config, workdir) of original:tiny trained 3 steps, each checkpointed, the last 2 averaged."""
  config = rh.make_config(rh.prepared_data_dir(), **TRAINED)
  workdir = str(tmp_path_factory.mktemp('select') / 'run')
  train.train_and_evaluate(config, workdir)
  return config, workdir


def raw_params(workdir, folder, step) -> list[np.ndarray]:
  """The parameter arrays of a checkpoint, read from its files with orbax alone."""
  with ocp.PyTreeCheckpointer() as reader:
    tree = reader.restore(os.path.join(workdir, folder, str(step), 'state'))
  return [np.asarray(x) for x in ocp.tree.to_flat_dict(tree['params']).values()]


def test_averaged_checkpoint_is_the_mean_of_the_last_n(trained):
  config, workdir = trained
  assert checkpoint.committed_steps(workdir) == [1, 2, 3]
  kept = {step: raw_params(workdir, checkpoint.CHECKPOINTS, step) for step in (1, 2, 3)}
  averaged = raw_params(workdir, checkpoint.AVERAGED, 3)
  mean = lambda steps: [np.mean([kept[s][i] for s in steps], axis=0) for i in range(len(averaged))]
  first, last = mean([1, 2]), mean([2, 3])
  assert any(not np.allclose(a, b) for a, b in zip(first, last))  # else first N == last N
  for got, want in zip(averaged, last):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert inference.restore(config, workdir, 'averaged')[2] == [2, 3]
  # Resuming the finished run restores step 3 as trained, not the average, and adds nothing.
  state, _ = train.train_and_evaluate(config, workdir)
  restored = [np.asarray(x) for x in ocp.tree.to_flat_dict(state.params).values()]
  for got, want in zip(restored, kept[3]):
    np.testing.assert_array_equal(got, want)
  assert checkpoint.committed_steps(workdir, checkpoint.AVERAGED) == [3]


@pytest.fixture(scope='module')
def selected(trained):
  """(config, workdir, the reads as (what, split), stdout) of --mode=select on the trained
  workdir, reading only SENTENCES sentences and BATCHES batches of what it asks for."""
  config, workdir = trained
  reads = []
  load_text_pairs, make_eval_batches = data.load_text_pairs, data.make_eval_batches

  def few_pairs(config, split):
    reads.append(('pairs', split))
    return load_text_pairs(config, split)[:SENTENCES]

  def few_batches(config, tokenizer, split='validation', **kwargs):
    reads.append(('batches', split))
    return make_eval_batches(config, tokenizer, split, **kwargs)[:BATCHES]

  stdout = io.StringIO()
  with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
    patch.setattr(data, 'load_text_pairs', few_pairs)
    patch.setattr(data, 'make_eval_batches', few_batches)
    selection.run_select(config, workdir)
  return config, workdir, reads, stdout.getvalue()


def read_json(workdir, name):
  with open(os.path.join(workdir, name), encoding='utf-8') as f:
    return json.load(f)


def test_select_scores_every_point_on_validation_only(selected):
  _, workdir, reads, stdout = selected
  assert reads and {split for _, split in reads} == {'validation'}
  table = read_json(workdir, selection.ROWS)
  points = {(row['checkpoint'], row['beam_size'], row['length_penalty']) for row in table['rows']}
  # '2,3' is the saved average: it is scored once, as 'averaged'.
  checkpoints = ('3', '1,2,3', 'averaged')
  assert points == {(name, beam, alpha) for name in checkpoints
                    for beam, alpha in selection.DECODINGS}
  # The loss does not depend on decoding: each checkpoint's is measured once.
  assert [what for what, _ in reads].count('batches') == len(checkpoints)
  assert len(table['rows']) == len(points) and table['metric'] == 'bleu'
  best = read_json(workdir, selection.SELECTED)
  assert best['value'] == max(row['value'] for row in table['rows'])
  assert {k: best[k] for k in table['rows'][0]} in table['rows'] and best['split'] == 'validation'
  assert '<- selected' in stdout and stdout.count('\n') >= len(points)


def fake_scores(monkeypatch, workdir, scores: dict):
  """A workdir whose checkpoints 1..3 and average of 2,3 exist by name only, evaluated to
  `scores` ({(checkpoint, beam, alpha): value}, 0 elsewhere) instead of by a model."""
  for folder, step in [(checkpoint.CHECKPOINTS, s) for s in (1, 2, 3)] + [(checkpoint.AVERAGED, 3)]:
    os.makedirs(os.path.join(workdir, folder, str(step)), exist_ok=True)
  monkeypatch.setattr(inference, 'restore', lambda config, workdir, which: (
      None, None, [2, 3] if which == 'averaged' else [int(s) for s in which.split(',')]))
  monkeypatch.setattr(inference, 'split_losses', lambda ctx, params, split: {})

  def run_eval(config, workdir, split, which, restored, losses):
    value = scores.get((which, config.beam_size, config.length_penalty), 0.0)
    return dict(averaged_steps=restored[2], bleu=value, loss=value)
  monkeypatch.setattr(inference, 'run_eval', run_eval)


def test_select_records_the_best_row(tmp_path, monkeypatch, capsys):
  config = rh.make_config(rh.prepared_data_dir(), **TRAINED)
  workdir = str(tmp_path)
  fake_scores(monkeypatch, workdir, {('1,2,3', 4, 1.0): 3.0, ('averaged', 4, 0.6): 2.0})
  best = selection.run_select(config, workdir)
  assert (best['checkpoint'], best['beam_size'], best['length_penalty']) == ('1,2,3', 4, 1.0)
  assert read_json(workdir, selection.SELECTED)['checkpoint'] == '1,2,3'
  marked = [line for line in capsys.readouterr().out.splitlines() if '<- selected' in line]
  assert len(marked) == 1 and marked[0].split()[:3] == ['1,2,3', '4', '1']
  config.variant = 'gpt_causal'  # no translation: the lowest validation loss wins
  as_configured = config.beam_size, config.length_penalty
  fake_scores(monkeypatch, workdir, {('3', *as_configured): 5.0, ('1,2,3', *as_configured): 1.0,
                                     ('averaged', *as_configured): 2.0})
  best = selection.run_select(config, workdir)
  assert (best['checkpoint'], best['beam_size'], best['metric']) == ('1,2,3', None, 'loss')


def test_eval_and_translate_use_the_selection_unless_told(tmp_path, monkeypatch):
  """selection.resolve, which launch.main applies to eval, translate and the other modes that load
  a model: the command line, then selected.json, then the config and the latest checkpoint."""
  config = rh.make_config(rh.prepared_data_dir(), **TRAINED)
  workdir = str(tmp_path)
  fake_scores(monkeypatch, workdir, {('averaged', 4, 1.0): 3.0})
  selection.run_select(config, workdir)
  used, which = selection.resolve(config, workdir, None, ())
  assert (which, used.beam_size, used.length_penalty) == ('averaged', 4, 1.0)
  used, which = selection.resolve(config, workdir, '2', ('length_penalty',))
  assert (which, used.beam_size, used.length_penalty) == ('2', 4, config.length_penalty)
  os.remove(os.path.join(workdir, selection.SELECTED))
  used, which = selection.resolve(config, workdir, None, ())
  assert (which, used.beam_size, used.length_penalty) == (
      'latest', config.beam_size, config.length_penalty)


def test_eval_command_uses_the_selection_below_explicit_flags(trained, tmp_path):
  """launch.main --mode=eval without --checkpoint: the recorded checkpoint and length penalty,
  and the beam size given on the command line (greedy) rather than the recorded one."""
  _, trained_workdir = trained
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained_workdir, workdir, ignore=shutil.ignore_patterns('eval_*', 'select*'))
  path = os.path.join(workdir, selection.SELECTED)
  with open(path, 'w', encoding='utf-8') as f:  # as run_select writes it
    json.dump(dict(checkpoint='1,2', steps=[1, 2], beam_size=4, length_penalty=1.0,
                   metric='bleu', value=1.0, split='validation', newest_step=3), f)
  command = rh.main_command(workdir, rh.prepared_data_dir(), '--mode=eval',
                            '--config.beam_size=1', **TRAINED)
  result = subprocess.run(command, cwd=rh.ROOT, capture_output=True, text=True,
                          timeout=rh.SUBPROCESS_TIMEOUT_S)
  assert result.returncode == 0, result.stderr[-3000:]
  assert [n for n in os.listdir(workdir) if n.startswith('eval_')] == [
      'eval_validation_avg1-2_greedy.json']
  written = read_json(workdir, 'eval_validation_avg1-2_greedy.json')
  assert (written['checkpoint'], written['beam_size'], written['length_penalty']) == ('1,2', 1, 1.0)
  assert (f'Using checkpoint 1,2 ({path}), beam_size 1 (--config.beam_size), length_penalty 1.0 '
          f'({path})') in result.stderr


@pytest.mark.parametrize('average, keep', [(-1, 3), (1, 3), (4, 3)])
def test_config_checks_refuse_averaging_what_is_not_kept(average, keep):
  config = rh.make_config(rh.prepared_data_dir(), average_last_checkpoints=average,
                          max_checkpoints_to_keep=keep)
  with pytest.raises(errors.ConfigError, match=rf'config.average_last_checkpoints={average} .*'
                                               rf'config.max_checkpoints_to_keep={keep}'):
    config_checks.check(config)
