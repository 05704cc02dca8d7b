"""launch/sweep.py: specs and their checks, commands, skipping finished runs, the report; and one
real two-run sweep through the subprocess path."""

import csv
import json
import os
import re
import shlex
import statistics
import subprocess
import sys

import pytest

from launch import sweep
from tests import run_helpers

ROOT = run_helpers.ROOT
CONFIG = os.path.join(ROOT, 'configs', 'original.py') + ':tiny'


def cli(*args, timeout=60) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'launch.sweep', *args], cwd=ROOT, timeout=timeout,
                        capture_output=True, text=True, check=False)


def write_spec(path, runs='[("baseline", {}), ("pre_ln", {"pre_ln": True})]', seeds='[0, 1, 2]'):
  path.write_text(f'def get_sweep():\n  return dict(config={CONFIG!r}, overrides=dict('
                  f'num_train_steps=5), runs={runs}, seeds={seeds})\n')
  return str(path)


@pytest.mark.parametrize('text, value', [('True', True), ('False', False), ('3', 3), ('0.1', 0.1),
                                         ('1e-4', 1e-4), ('learned', 'learned'), ('a:b', 'a:b')])
def test_values_are_parsed_like_the_command_line(text, value):
  parsed = sweep.parse_value(text)
  assert parsed == value and type(parsed) is type(value)


def test_grid_is_the_cartesian_product_named_by_its_values():
  runs = sweep.expand(sweep.load_sweep(
      None, CONFIG, ['pre_ln=False,True', 'label_smoothing=0.0,0.1,0.2'],
      ['num_train_steps=7', 'positional=learned'], ['0', '1']))
  assert len(runs) == 2 * 3 * 2 and len({r.name for r in runs}) == 12
  assert len({r.group for r in runs}) == 6
  assert runs[0].name == 'pre_ln=False,label_smoothing=0.0,seed=0'
  assert runs[-1].name == 'pre_ln=True,label_smoothing=0.2,seed=1'
  assert runs[-1].fields == dict(num_train_steps=7, positional='learned', pre_ln=True,
                                 label_smoothing=0.2, seed=1)


def test_spec_file_runs_times_seeds_and_the_flags_on_top(tmp_path):
  spec = write_spec(tmp_path / 'spec.py')
  runs = sweep.expand(sweep.load_sweep(spec, None, [], ['eval_every_steps=5'], None))
  assert [r.name for r in runs] == [f'{g},seed={s}' for g in ('baseline', 'pre_ln')
                                    for s in range(3)]
  assert runs[4].fields == dict(num_train_steps=5, eval_every_steps=5, pre_ln=True, seed=1)
  assert [r.name for r in sweep.expand(sweep.load_sweep(spec, None, [], [], ['7']))] == [
      'baseline,seed=7', 'pre_ln,seed=7']
  ablation = sweep.load_sweep(os.path.join(ROOT, 'configs', 'sweeps', 'original_ablation.py'),
                              None, [], [], None)
  assert [r.name for r in sweep.expand(ablation)] == [
      f'{name},seed={seed}' for name in ('baseline', 'pre_ln', 'no_label_smoothing',
                                         'learned_positions', 'untied_embeddings')
      for seed in (0, 1)]


@pytest.mark.parametrize('grid, sets, named', [
    (['pre_lnn=False,True'], [], ["--grid: 'pre_lnn' is not a config field", "mean 'pre_ln'?"]),
    (['pre_ln=False,True'], ['num_steps=3'], ["--set: 'num_steps' is not a config field"]),
    (['pre_ln=False,maybe'], [], ['--grid: pre_ln=', 'maybe']),
    (['seed=1,2'], [], ['--grid', 'seeds']),
])
def test_bad_field_or_value_fails_before_anything_runs(tmp_path, grid, sets, named):
  workdir = tmp_path / 'sweep'
  result = cli(f'--config={CONFIG}', f'--workdir={workdir}', *[f'--grid={g}' for g in grid],
               *[f'--set={s}' for s in sets])
  assert result.returncode != 0 and not workdir.exists()
  assert all(text in result.stderr for text in named), result.stderr


def test_bad_field_in_a_spec_file_names_the_file_and_the_run(tmp_path):
  spec = write_spec(tmp_path / 'spec.py', runs='[("baseline", {}), ("typo", {"pre_lnn": True})]')
  message = f"{spec} (run typo): 'pre_lnn' is not a config field"
  with pytest.raises(ValueError, match=re.escape(message)):
    sweep.load_sweep(spec, None, [], [], None)


def test_print_mode_gives_one_launch_command_per_run(tmp_path):
  result = cli(f'--config={CONFIG}', '--workdir=runs/s', '--grid=pre_ln=False,True',
               '--set=positional=learned', '--seeds=0,3', '--mode=print')
  assert result.returncode == 0, result.stderr
  commands = [shlex.split(line) for line in result.stdout.splitlines()]
  assert len(commands) == 4
  for command, (pre_ln, seed) in zip(commands, [(p, s) for p in ('False', 'True') for s in (0, 3)]):
    assert command[:4] == ['python', '-m', 'launch.main', f'--config={CONFIG}']
    assert command[4:] == [f'--workdir=runs/s/pre_ln={pre_ln},seed={seed}',
                           '--config.positional=learned', f'--config.pre_ln={pre_ln}',
                           f'--config.seed={seed}']
  assert not (tmp_path / 'runs').exists()


def write_record(workdir, **record):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, sweep.RECORD), 'w', encoding='utf-8') as f:
    json.dump(record, f)


def test_run_all_skips_finished_runs_and_survives_a_failing_one(tmp_path):
  s = sweep.load_sweep(None, CONFIG, ['pre_ln=False,True'], [], ['0', '1'])
  write_record(tmp_path / 'pre_ln=False,seed=0', returncode=0, wall_s=5.0, attempts=1)
  write_record(tmp_path / 'pre_ln=False,seed=1', returncode=-15, wall_s=60.0, attempts=1)
  calls = []

  def runner(command, log_path):
    calls.append(command)
    assert os.path.dirname(log_path) == command[4].split('=', 1)[1]
    return 3 if command[-2:] == ['--config.pre_ln=True', '--config.seed=0'] else 0

  assert sweep.run_all(s, str(tmp_path), runner) == ['pre_ln=True,seed=0']
  assert [c[4] for c in calls] == [f'--workdir={tmp_path}/{name}' for name in (
      'pre_ln=False,seed=1', 'pre_ln=True,seed=0', 'pre_ln=True,seed=1')]
  resumed = sweep.read_json(tmp_path / 'pre_ln=False,seed=1' / sweep.RECORD)
  assert resumed['returncode'] == 0 and resumed['attempts'] == 2 and resumed['wall_s'] >= 60
  assert resumed['command'] == shlex.join(calls[0])
  calls.clear()
  assert sweep.run_all(s, str(tmp_path), runner) == ['pre_ln=True,seed=0']  # only it reruns
  assert [c[4] for c in calls] == [f'--workdir={tmp_path}/pre_ln=True,seed=0']


def write_metrics(workdir, evals: list[dict], last_step: int):
  """metrics.jsonl with a train record every step up to last_step and the given eval records."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w', encoding='utf-8') as f:
    for step in range(1, last_step + 1):
      f.write(json.dumps(dict(step=step, time=0.0, train_loss=5.0)) + '\n')
    f.write('{"step": 9, "train_lo\n')  # cut short by a kill
    for record in evals:
      f.write(json.dumps(dict(time=0.0, eval_sample='a dog', eval_bleu_signature='x', **record))
              + '\n')


def test_report_means_over_seeds_final_and_best_values_and_unfinished_runs(tmp_path):
  s = sweep.load_sweep(None, CONFIG, ['pre_ln=False,True'], [], ['0', '1'])
  finals = {0: dict(eval_loss=2.5, eval_bleu=20.0), 1: dict(eval_loss=2.0, eval_bleu=24.0)}
  for seed, final in finals.items():
    workdir = tmp_path / f'pre_ln=False,seed={seed}'
    write_metrics(workdir, [dict(step=2, eval_loss=1.5, eval_bleu=10.0, eval_ppl=4.0),
                            dict(step=3, eval_loss=3.0, eval_bleu=26.0, eval_ppl=5.0),
                            dict(step=4, eval_loss=9.0, eval_bleu=30.0, eval_ppl=9.0),
                            dict(step=4, eval_ppl=8.0, **final)],  # resumed: the last step 4 wins
                  last_step=4)
    write_record(workdir, returncode=0, wall_s=60.0 * (seed + 1), attempts=1)
  write_metrics(tmp_path / 'pre_ln=True,seed=0', [], last_step=3)  # pre_ln=True,seed=1: not run

  markdown = sweep.report(s, str(tmp_path), 'python -m launch.sweep ...')
  with open(tmp_path / 'results.csv', encoding='utf-8') as f:
    rows = {r['name']: r for r in csv.DictReader(f)}
  assert len(rows) == 4
  first = rows['pre_ln=False,seed=0']
  assert float(first['final_eval_loss']) == 2.5 and float(first['best_eval_loss']) == 1.5
  assert float(first['best_eval_bleu']) == 26.0 and float(first['best_eval_ppl']) == 4.0
  assert first['steps'] == '4' and float(first['wall_min']) == 1.0
  assert [rows[f'pre_ln=True,seed={s}']['status'] for s in (0, 1)] == ['incomplete', 'not run']
  assert rows['pre_ln=True,seed=0']['steps'] == '3'
  assert rows['pre_ln=True,seed=0']['final_eval_loss'] == ''  # no evaluation yet
  crashed = sweep.summarize_run(sweep.expand(s)[3], [], None, dict(returncode=1, wall_s=1.0))
  assert crashed['status'] == 'failed'

  lines = markdown.splitlines()
  assert lines[0] == ('| run | status | seeds | steps | wall (min) | eval_loss | eval_ppl '
                      '| eval_bleu |')
  loss = f'{statistics.mean([2.5, 2.0]):.4g} ± {statistics.stdev([2.5, 2.0]):.2g}'
  assert lines[2] == f'| pre_ln=False | done | 2 | 4 | 1.5 ± 0.71 | {loss} | 8 | 22 ± 2.8 |'
  assert lines[3] == '| pre_ln=True | incomplete, not run | 0 | 3 |  |  |  |  |'
  with open(tmp_path / 'results.md', encoding='utf-8') as f:
    text = f.read()
  assert CONFIG in text and 'python -m launch.sweep ...' in text and markdown in text
  with open(tmp_path / 'curves.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


@run_helpers.needs_corpus
def test_real_sweep_of_two_runs_then_a_rerun_skips_them(tmp_path):
  sets = run_helpers.overrides(run_helpers.prepared_data_dir(), num_train_steps=4,
                               eval_every_steps=4, checkpoint_every_steps=4, log_every_steps=2)
  args = ['--config=configs/original.py:tiny', f'--workdir={tmp_path}',
          '--grid=shuffle_buffer_seed=0,1', *[f'--set={k}={v}' for k, v in sets.items()]]
  first = cli(*args, timeout=run_helpers.SUBPROCESS_TIMEOUT_S)
  assert first.returncode == 0, first.stdout + first.stderr
  with open(tmp_path / 'results.md', encoding='utf-8') as f:
    table = f.read()
  for name in ('shuffle_buffer_seed=0', 'shuffle_buffer_seed=1'):
    assert f'| {name} | done | 1 | 4 |' in table
    assert os.path.exists(tmp_path / f'{name},seed=0' / 'checkpoints' / '4')
  metrics = (tmp_path / 'shuffle_buffer_seed=0,seed=0' / 'metrics.jsonl').read_text()

  again = cli(*args)
  assert again.returncode == 0, again.stdout + again.stderr
  assert again.stdout.count('finished before, skipped') == 2
  assert (tmp_path / 'shuffle_buffer_seed=0,seed=0' / 'metrics.jsonl').read_text() == metrics


def test_report_gives_step_time_memory_and_cache_bytes_when_runs_logged_them(tmp_path):
  s = sweep.load_sweep(None, CONFIG, ['num_kv_heads=2'], [], ['0'])
  workdir = tmp_path / 'num_kv_heads=2,seed=0'
  write_metrics(workdir, [dict(step=3, eval_loss=2.0)], last_step=0)
  with open(workdir / 'metrics.jsonl', 'a', encoding='utf-8') as f:
    for step, ms in ((1, 30.0), (2, 50.0), (3, 40.0)):
      memory = dict(step_memory_mib=123.4) if step == 1 else {}  # the first record only
      f.write(json.dumps(dict(step=step, time=0.0, train_loss=5.0, step_ms=ms, **memory)) + '\n')
  config = dict(variant='original', num_layers=6, num_decoder_layers=3, num_heads=4,
                num_kv_heads=2, d_model=32)
  (workdir / 'config.json').write_text(json.dumps(config))
  write_record(workdir, returncode=0, wall_s=60.0, attempts=1)
  lines = sweep.report(s, str(tmp_path), 'python -m launch.sweep ...').splitlines()
  assert lines[0].endswith('| eval_loss | step (ms) | step memory (MiB) | cache bytes / token |')
  # Median of 30, 50, 40 ms; keys and values of 3 decoder layers x 2 heads x 8 wide, float32.
  assert lines[2].endswith(f'| 2 | 40 | 123.4 | {2 * 3 * 2 * 8 * 4} |')
