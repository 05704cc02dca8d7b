r"""Sweeps: one base config, a grid or a list of overrides, each run repeated per seed.

  python -m launch.sweep --sweep=configs/sweeps/original_ablation.py --workdir=runs/ablation
  python -m launch.sweep --config=configs/original.py:tiny --workdir=runs/sweep \
      --grid=pre_ln=False,True --grid=label_smoothing=0.0,0.1 --set=num_train_steps=100 --seeds=0,1
  python -m launch.sweep ... --mode=print   # one launch.main command per run, for a cluster
  python -m launch.sweep ... --mode=report  # only tabulate and plot what the runs wrote so far

A spec file's get_sweep() returns dict(config='configs/VARIANT.py:SIZE', overrides={field: value}
for every run, grid={field: [values]} (cartesian product) or runs=[(name, {field: value})], and
seeds=[ints] (default [0])); --set and --seeds add to / replace its overrides and seeds.
--mode=run trains the runs one after another, each in WORKDIR/NAME by a `launch.main` subprocess
(log in WORKDIR/NAME/sweep.log), skipping runs that finished and resuming the others, then reports:
WORKDIR/results.md (groups of seeds, mean ± sample std of the final validation metrics, the
median train step time and the decoding cache's bytes per token),
WORKDIR/results.csv (one row per run) and WORKDIR/curves.png (validation curves).
"""

import ast
import csv
import dataclasses
import difflib
import importlib.util
import itertools
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

from absl import app, flags

RECORD = 'sweep_run.json'  # In each run's workdir: command, last exit code, wall time, attempts.
TABLE_METRICS = ('eval_loss', 'eval_ppl', 'eval_accuracy', 'eval_bleu', 'eval_bleu_lc', 'eval_chrf')
BEST = dict(eval_loss=min, eval_nll=min, eval_ppl=min, eval_accuracy=max, eval_bleu=max,
            eval_bleu_lc=max, eval_chrf=max)
PLOT_METRICS = ('eval_loss', 'eval_bleu')
COST_HEADERS = dict(step_ms='step (ms)', step_memory_mib='step memory (MiB)',
                    cache_bytes_per_token='cache bytes / token')


@dataclasses.dataclass
class Sweep:
  config: str  # configs/VARIANT.py:SIZE
  overrides: dict  # For every run.
  runs: list  # [(group name, {field: value})], each repeated per seed.
  seeds: list


@dataclasses.dataclass
class Run:
  name: str  # f'{group},seed={seed}': the run's subdirectory.
  group: str  # Runs differing only by seed share it.
  seed: int
  fields: dict  # Every --config.FIELD=VALUE of the run.


def parse_value(text: str):
  """'True' -> True, '3' -> 3, '0.1' -> 0.1, anything else a string, as on the command line."""
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  return value if isinstance(value, (bool, int, float)) else text


def split_assignments(texts: list[str], flag: str) -> dict[str, str]:
  """['field=text', ...] -> {field: text}."""
  pairs = [text.partition('=') for text in texts]
  for text, (field, sep, _) in zip(texts, pairs):
    if not sep or not field:
      raise ValueError(f'{flag}={text}: expected FIELD=VALUE')
  return {field: value for field, _, value in pairs}


def load_module(path: str):
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(config_spec: str):
  """The ConfigDict that `--config=config_spec` would give launch.main."""
  path, _, size = config_spec.partition(':')
  module = load_module(path)
  return module.get_config(size) if size else module.get_config()


def check_fields(config, values: dict, where: str):
  """Fails naming `where` unless each field exists and accepts each of its values {field: [v]}."""
  for field, field_values in values.items():
    if field not in config:
      close = difflib.get_close_matches(field, list(config.keys()), n=1)
      hint = f' (did you mean {close[0]!r}?)' if close else ''
      raise ValueError(f'{where}: {field!r} is not a config field{hint}')
    if field == 'seed':
      raise ValueError(f'{where}: give seeds as the sweep\'s seeds, not as the field seed')
    for value in field_values:
      try:
        config[field] = value  # ConfigDict checks the type.
      except TypeError as e:
        raise ValueError(f'{where}: {field}={value!r}: {e}') from e


def grid_runs(grid: dict) -> list:
  """[(name, overrides)] of the cartesian product, named 'field=value,...' in grid order."""
  combos = itertools.product(*grid.values())
  return [(','.join(f'{k}={v}' for k, v in zip(grid, combo)) or 'base', dict(zip(grid, combo)))
          for combo in combos]


def make_sweep(config: str, overrides: dict, grid: dict | None, runs: list | None, seeds: list,
               where) -> Sweep:
  """A Sweep checked against the base config; where('overrides' | 'grid' | 'run NAME') names
  the spec file part or flag in errors."""
  base = load_config(config)
  check_fields(base, {k: [v] for k, v in overrides.items()}, where('overrides'))
  if grid is not None:
    check_fields(base, grid, where('grid'))
    runs = grid_runs(grid)
  for name, run_overrides in runs:
    check_fields(base, {k: [v] for k, v in run_overrides.items()}, where(f'run {name}'))
  return Sweep(config, dict(overrides), list(runs), [int(s) for s in seeds])


def sweep_from_file(path: str, extra_overrides: dict, seeds: list | None) -> Sweep:
  """The sweep of spec file `path`, plus --set overrides; --seeds replace the spec's seeds."""
  spec = load_module(path).get_sweep()
  unknown = set(spec) - {'config', 'overrides', 'grid', 'runs', 'seeds'}
  if unknown or 'config' not in spec or ('grid' in spec) == ('runs' in spec):
    raise ValueError(f'{path}: get_sweep() gives config, exactly one of grid and runs, and '
                     f'optionally overrides and seeds; unknown keys: {sorted(unknown)}')
  where = lambda part: f'{path} ({"overrides or --set" if part == "overrides" else part})'
  return make_sweep(spec['config'], {**spec.get('overrides', {}), **extra_overrides},
                    spec.get('grid'), spec.get('runs'), seeds or spec.get('seeds', [0]), where)


def load_sweep(spec_path: str | None, config: str | None, grid_flags: list, set_flags: list,
               seeds: list | None) -> Sweep:
  """The sweep the flags describe: a spec file (plus --set, --seeds) or --config with --grid."""
  extra = {k: parse_value(v) for k, v in split_assignments(set_flags, '--set').items()}
  if spec_path and (config or grid_flags):
    raise ValueError('--sweep replaces --config and --grid')
  if spec_path:
    return sweep_from_file(spec_path, extra, seeds)
  if not config:
    raise ValueError('give --sweep=SPEC.py, or --config=VARIANT.py:SIZE with --grid')
  grid = {k: [parse_value(v) for v in values.split(',')]  # (no value can contain a comma)
          for k, values in split_assignments(grid_flags, '--grid').items()}
  return make_sweep(config, extra, grid, None, seeds or [0],
                    {'overrides': '--set', 'grid': '--grid'}.get)


def expand(sweep: Sweep) -> list[Run]:
  return [Run(f'{group},seed={seed}', group, seed, {**sweep.overrides, **fields, 'seed': seed})
          for group, fields in sweep.runs for seed in sweep.seeds]


def command(sweep: Sweep, run: Run, workdir: str, python: str = sys.executable) -> list[str]:
  return [python, '-m', 'launch.main', f'--config={sweep.config}', f'--workdir={workdir}',
          *[f'--config.{k}={v}' for k, v in run.fields.items()]]


def read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def run_logged(cmd: list[str], log_path: str) -> int:
  """Runs cmd to completion, output appended to log_path; returns its exit code."""
  with open(log_path, 'a', encoding='utf-8') as log:
    return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def run_all(sweep: Sweep, sweep_workdir: str, runner=run_logged) -> list[str]:
  """Runs every unfinished run (a crash stops only that run); returns the names that failed."""
  runs, failed = expand(sweep), []
  for i, run in enumerate(runs, 1):
    workdir = os.path.join(sweep_workdir, run.name)
    record_path = os.path.join(workdir, RECORD)
    record = read_json(record_path)
    if record.get('returncode') == 0:
      print(f'[{i}/{len(runs)}] {run.name}: finished before, skipped', flush=True)
      continue
    os.makedirs(workdir, exist_ok=True)
    log_path = os.path.join(workdir, 'sweep.log')
    print(f'[{i}/{len(runs)}] {run.name}: running, log in {log_path}', flush=True)
    cmd = command(sweep, run, workdir)
    start = time.monotonic()
    returncode = runner(cmd, log_path)
    record = dict(command=shlex.join(cmd), returncode=returncode, attempts=record.get(
        'attempts', 0) + 1, wall_s=round(record.get('wall_s', 0) + time.monotonic() - start, 1))
    with open(record_path, 'w', encoding='utf-8') as f:
      json.dump(record, f, indent=2)
    print(f'[{i}/{len(runs)}] {run.name}: ' + (f'FAILED (exit {returncode})' if returncode else
                                              f'done in {record["wall_s"] / 60:.1f} min'),
          flush=True)
    if returncode:
      failed.append(run.name)
  return failed


def _records(workdir: str) -> list[dict] | None:
  """metrics.jsonl's records (None: no metrics yet)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return None
  records = []
  with open(path, encoding='utf-8') as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        pass  # A line cut short by a killed run.
  return records


def read_metrics(workdir: str) -> tuple[list[dict], int | None]:
  """metrics.jsonl's validation records by step and its last step (None: no metrics yet).

  A resumed run logs the steps after its last checkpoint again: the later record wins.
  """
  records = _records(workdir)
  if records is None:
    return [], None
  by_step = {r['step']: r for r in records if 'eval_loss' in r}
  return [by_step[s] for s in sorted(by_step)], max((r['step'] for r in records), default=None)


def run_costs(workdir: str) -> dict:
  """The median logged train step time (ms), the memory its compiled step planned per device
  (MiB: its arguments and temporaries; perf.planned_memory_mib) and the key/value cache's bytes
  per decoded token (float32, every layer of the stack that decodes) of a run, from what it
  wrote."""
  costs = {}
  records = _records(workdir) or []
  step_ms = [r['step_ms'] for r in records if 'step_ms' in r]
  if step_ms:
    costs['step_ms'] = round(statistics.median(step_ms), 2)
  step_memory = [r['step_memory_mib'] for r in records if 'step_memory_mib' in r]
  if step_memory:
    costs['step_memory_mib'] = round(max(step_memory), 1)
  config = read_json(os.path.join(workdir, 'config.json'))
  if config:
    layers = config['num_decoder_layers' if config['variant'] == 'original' else 'num_layers']
    kv_heads = config.get('num_kv_heads') or config['num_heads']
    costs['cache_bytes_per_token'] = 2 * layers * kv_heads * (
        config['d_model'] // config['num_heads']) * 4
  return costs


def summarize_run(run: Run, evals: list[dict], steps: int | None, record: dict) -> dict:
  """One results.csv row: status, steps, wall time, final_* and best_* validation metrics."""
  status = ('not run' if steps is None else 'incomplete') if 'returncode' not in record else (
      'failed' if record['returncode'] else 'done')
  row = dict(name=run.name, group=run.group, seed=run.seed, status=status, steps=steps,
             wall_min=round(record['wall_s'] / 60, 2) if 'wall_s' in record else None)
  if evals:
    row.update({f'final_{k}': v for k, v in evals[-1].items()
                if k.startswith('eval_') and isinstance(v, (int, float))})
    row.update({f'best_{k}': pick(r[k] for r in evals if k in r)
                for k, pick in BEST.items() if k in evals[-1]})
  return row


def mean_std(values: list) -> str:
  """'mean ± sample std', or just the value where all runs agree (or there is one)."""
  mean = statistics.mean(values)
  text = str(int(mean)) if float(mean).is_integer() else f'{mean:.4g}'
  return text + (f' ± {statistics.stdev(values):.2g}' if len(set(values)) > 1 else '')


def group_table(rows: list[dict]) -> list[list[str]]:
  """Header + one row per group: status, seeds with results, steps, wall time, final metrics."""
  metrics = [m for m in TABLE_METRICS if any(f'final_{m}' in r for r in rows)]
  costs = [c for c in COST_HEADERS if any(c in r for r in rows)]
  columns = ['steps', 'wall_min'] + [f'final_{m}' for m in metrics] + costs
  table = [['run', 'status', 'seeds', 'steps', 'wall (min)'] + metrics
           + [COST_HEADERS[c] for c in costs]]
  for group in dict.fromkeys(r['group'] for r in rows):
    members = [r for r in rows if r['group'] == group]
    status = ', '.join(sorted({r['status'] for r in members}))
    cells = [mean_std(v) if (v := [r[c] for r in members if r.get(c) is not None]) else ''
             for c in columns]
    table.append([group, status, str(sum('final_eval_loss' in r for r in members))] + cells)
  return table


def plot_curves(curves: dict, path: str):
  """One panel per metric of PLOT_METRICS present, one line per run of curves {name: evals}."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  metrics = [m for m in PLOT_METRICS if any(m in r for recs in curves.values() for r in recs)]
  fig = Figure(figsize=(6 * len(metrics), 4.5), layout='constrained')
  for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False)[0], metrics):
    for name, records in curves.items():
      points = [(r['step'], r[metric]) for r in records if metric in r]
      if points:
        ax.plot(*zip(*points), marker='.', label=name)
    ax.set(xlabel='step', title=f'validation {metric[5:]}')
    ax.legend(fontsize=7)
  fig.savefig(path, dpi=100)


def report(sweep: Sweep, sweep_workdir: str, produced_by: str) -> str:
  """Writes results.md, results.csv and curves.png in sweep_workdir; returns the markdown table."""
  runs, rows, curves = expand(sweep), [], {}
  for run in runs:
    workdir = os.path.join(sweep_workdir, run.name)
    curves[run.name], steps = read_metrics(workdir)
    record = read_json(os.path.join(workdir, RECORD))
    rows.append(dict(summarize_run(run, curves[run.name], steps, record), **run_costs(workdir)))
  os.makedirs(sweep_workdir, exist_ok=True)
  columns = list(dict.fromkeys(k for r in rows for k in r))
  with open(os.path.join(sweep_workdir, 'results.csv'), 'w', encoding='utf-8', newline='') as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)
  table = group_table(rows)
  lines = ['| ' + ' | '.join(row) + ' |' for row in table]
  lines.insert(1, '|' + '---|' * len(table[0]))
  markdown = '\n'.join(lines)
  shared = ', '.join(f'{k}={v}' for k, v in sweep.overrides.items()) or 'none'
  with open(os.path.join(sweep_workdir, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(f'Base config `{sweep.config}`, shared overrides: {shared}; final validation metrics, '
            f'mean ± sample std over seeds {sweep.seeds}.\nProduced by `{produced_by}`.\n\n'
            f'{markdown}\n')
  if any(curves.values()):
    plot_curves(curves, os.path.join(sweep_workdir, 'curves.png'))
  return markdown


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  try:
    sweep = load_sweep(f.sweep, f.config, f.grid, f.set, f.seeds)
  except ValueError as e:
    sys.exit(f'launch.sweep: {e}')  # Before anything runs.
  if f.mode == 'print':
    for run in expand(sweep):
      print(shlex.join(command(sweep, run, os.path.join(f.workdir, run.name), python='python')))
    return
  failed = run_all(sweep, f.workdir) if f.mode == 'run' else []
  print(report(sweep, f.workdir, shlex.join(['python', '-m', 'launch.sweep', *sys.argv[1:]])))
  if failed:
    sys.exit(f'{len(failed)} run(s) failed (see their sweep.log): {", ".join(failed)}')


def define_flags():
  """Defined only when run as a script: tests import this module beside other launch scripts."""
  flags.DEFINE_string('sweep', None, 'A configs/sweeps/NAME.py spec (or --config and --grid).')
  flags.DEFINE_string('config', None, 'Without --sweep: the base configs/VARIANT.py:SIZE.')
  flags.DEFINE_multi_string('grid', [], 'Without --sweep: FIELD=V1,V2,... (cartesian product).')
  flags.DEFINE_multi_string('set', [], 'FIELD=VALUE for every run.')
  flags.DEFINE_list('seeds', None, 'Seeds each run is repeated with (config field seed).')
  flags.DEFINE_string('workdir', None, 'Sweep directory: one subdirectory per run, results.')
  flags.DEFINE_enum('mode', 'run', ('run', 'print', 'report'), 'What to do.')
  flags.mark_flags_as_required(['workdir'])


if __name__ == '__main__':
  define_flags()
  app.run(main)
