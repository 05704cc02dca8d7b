"""launch/tpu_vm.sh and launch/slurm.sh: syntax, the commands they run (DRY_RUN=1), and the
SLURM script's time-limit path with stand-ins for srun, scontrol and python (no cluster here)."""

import os
import shlex
import signal
import subprocess
import time

import numpy as np
import pytest

from configs import common

ROOT = common.REPO_ROOT
TPU = os.path.join(ROOT, 'launch', 'tpu_vm.sh')
SLURM = os.path.join(ROOT, 'launch', 'slurm.sh')


def dry_run(script, *args, **env) -> list[list[str]]:
  """The commands `script` would run, each as its argument list."""
  result = subprocess.run(['bash', script, *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, DRY_RUN='1', **env), check=True)
  lines = result.stdout.splitlines()
  assert lines and all(line.startswith('+ ') for line in lines), result.stdout
  return [shlex.split(line[2:]) for line in lines]


def flag(command: list[str], name: str) -> str:
  values = [a.split('=', 1)[1] for a in command if a.startswith(f'--{name}=')]
  assert len(values) == 1, (name, command)
  return values[0]


@pytest.mark.parametrize('script', [TPU, SLURM])
def test_scripts_are_valid_bash_and_print_usage(script):
  subprocess.run(['bash', '-n', script], check=True, timeout=30)
  usage = subprocess.run(['bash', script], capture_output=True, text=True, timeout=30)
  assert usage.returncode == 2 and 'DRY_RUN' in usage.stdout


def test_tpu_vm_create_copy_run_on_all_workers_delete():
  commands = dry_run(TPU, 'all', '--', '--config.num_train_steps=100',
                     '--config.batch_size=256', TPU_NAME='tpu1', ZONE='us-east5-a',
                     ACCELERATOR_TYPE='v5p-16', SHARED='/mnt/fs', SPOT='1', NFS='10.1.1.1:/fs')
  create, archive, scp, setup, prepare, train, delete = commands
  assert create[:5] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create'] and create[5] == 'tpu1'
  assert flag(create, 'zone') == 'us-east5-a' and flag(create, 'accelerator-type') == 'v5p-16'
  assert '--spot' in create
  assert archive[:4] == ['git', '-C', ROOT, 'archive']  # this checkout's committed code
  assert scp[3:5] == ['tpu-vm', 'scp'] and flag(scp, 'worker') == 'all'
  for command in (setup, prepare, train):
    assert command[3:6] == ['tpu-vm', 'ssh', 'tpu1']
    subprocess.run(['bash', '-n', '-c', flag(command, 'command')], check=True, timeout=30)
  assert flag(setup, 'worker') == 'all'
  assert 'sudo mount -t nfs -o vers=3 10.1.1.1:/fs /mnt/fs' in flag(setup, 'command')
  assert flag(prepare, 'worker') == '0'  # one worker prepares the shared data
  assert shlex.split(flag(prepare, 'command'))[4:] == [
      '-m', 'launch.prepare_data', '--config=configs/original.py:base',
      '--config.data_dir=/mnt/fs/data', '--config.num_train_steps=100',
      '--config.batch_size=256']
  assert flag(train, 'worker') == 'all'  # the same command on every worker
  remote = shlex.split(flag(train, 'command'))
  main = remote[remote.index('launch.main') + 1:remote.index('2>&1')]
  assert main == ['--workdir=/mnt/fs/runs/original_base', '--config=configs/original.py:base',
                  '--config.data_dir=/mnt/fs/data', '--config.num_train_steps=100',
                  '--config.batch_size=256']
  assert delete[4:6] == ['delete', 'tpu1'] and '--quiet' in delete


def test_tpu_vm_clone_instead_of_copy():
  (setup,) = dry_run(TPU, 'setup', CODE_URL='https://example.com/t.git', CODE_REF='v1')
  assert 'git clone --quiet https://example.com/t.git transformer' in flag(setup, 'command')
  assert 'checkout --quiet v1' in flag(setup, 'command')


@pytest.mark.parametrize('per, tasks_per_node', [('gpu', '8'), ('node', '1')])
def test_slurm_one_process_per_gpu_or_per_node(per, tasks_per_node):
  args = ['--config=configs/gpt_causal.py:small', '--workdir=/shared/w', '--config.seed=3']
  commands = dry_run(SLURM, *args, PER=per, SLURM_JOB_NUM_NODES='4', GPUS_PER_NODE='8')
  if per == 'node':  # every GPU of the node in its one process
    assert commands.pop(0) == ['export', 'JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7']
  prepare, train = commands
  assert prepare[:3] == ['srun', '--nodes=1', '--ntasks=1']
  assert prepare[-3:] == ['launch.prepare_data', '--config=configs/gpt_causal.py:small',
                          '--config.seed=3']  # no --workdir: it takes the config only
  assert train[0] == 'srun' and flag(train, 'nodes') == '4'
  assert flag(train, 'ntasks-per-node') == tasks_per_node
  assert train[train.index('launch.main') + 1:] == args


def write_executable(path, text):
  with open(path, 'w', encoding='utf-8') as f:
    f.write('#!/usr/bin/env bash\n' + text)
  os.chmod(path, 0o755)


def test_slurm_time_limit_stops_the_tasks_and_requeues(tmp_path):
  """USR1 (sent by SLURM before the time limit) -> SIGTERM to the tasks -> requeue once they
  exit 0. srun, scontrol and python are stand-ins that record what they get."""
  log = tmp_path / 'calls.log'
  bin_dir, venv_bin = tmp_path / 'bin', tmp_path / 'venv' / 'bin'
  bin_dir.mkdir()
  venv_bin.mkdir(parents=True)
  write_executable(bin_dir / 'srun', 'while [[ $1 == --* ]]; do shift; done; exec "$@"\n')
  write_executable(bin_dir / 'scontrol', f'echo "scontrol $*" >> {log}\n')
  write_executable(venv_bin / 'python', f'''
if [[ " $* " == *" launch.main "* ]]; then
  trap 'echo "main got TERM" >> {log}; exit 0' TERM
  echo "main started" >> {log}
  while true; do sleep 0.05; done
fi
echo "prepare $*" >> {log}
''')
  env = dict(os.environ, PATH=f'{bin_dir}:{os.environ["PATH"]}', VENV=str(tmp_path / 'venv'),
             SLURM_JOB_ID='42', SLURM_SUBMIT_DIR=ROOT, SLURM_JOB_NUM_NODES='1')
  env.pop('DRY_RUN', None)
  proc = subprocess.Popen(['bash', SLURM, '--config=configs/original.py:tiny', '--workdir=w'],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.monotonic() + 30
    while not (log.exists() and 'main started' in log.read_text()):
      assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
      time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, output
  assert log.read_text().splitlines() == [
      'prepare -m launch.prepare_data --config=configs/original.py:tiny', 'main started',
      'main got TERM', 'scontrol requeue 42']
  assert 'requeueing job 42' in output


def test_benchmark_memory_fsdp_holds_an_eighth_per_device():
  from configs import gpt_causal  # pylint: disable=import-outside-toplevel
  from launch import benchmark_memory  # pylint: disable=import-outside-toplevel
  config = gpt_causal.get_config('tiny')
  per_device = lambda r: r['params'] + r['opt']
  fsdp = benchmark_memory.measure(config, 64, 'fsdp', materialize=True)
  assert np.array_equal(per_device(fsdp), per_device(  # measured shards == the shardings' sizes
      benchmark_memory.measure(config, 64, 'fsdp', materialize=False)))
  replicated = benchmark_memory.measure(config, 64, 'replicated', materialize=False)
  assert len(set(per_device(replicated))) == 1
  assert per_device(replicated)[0] > 2 * replicated['params_total']  # params + Adam mu, nu
  assert per_device(fsdp).max() / per_device(replicated).max() < 0.2  # ~1/8 (norms replicate)


@pytest.mark.parametrize('kind, growth', [('full', (6, 20)), ('local', (0.5, 2)),
                                          ('strided', (1.1, 3)), ('low_rank', (0.5, 2)),
                                          ('lsh', (0.5, 2))])
def test_attention_memory_grows_as_each_kind_says(kind, growth):
  """At a fixed token budget the step's planned memory grows with L for full attention (logits
  [B, H, L, L]: towards x16 from 64 to 1024 tokens as they come to dominate), stays about flat
  for local, low-rank and lsh attention (L x window, L x rank, L x rounds x chunk), and grows
  only with the L / window strided keys for strided attention (52 -> 112 keys per query here:
  x1.5 measured)."""
  from configs import bert_mlm  # pylint: disable=import-outside-toplevel
  from launch import benchmark_length  # pylint: disable=import-outside-toplevel
  config = bert_mlm.get_config('tiny')
  config.update(packing=False, attention_kind=kind, attention_window=16, low_rank_dim=16,
                num_heads=4, d_model=16)
  memory = [benchmark_length.compiled_step(config, length, 2048)[0].memory_analysis()
            .temp_size_in_bytes for length in (64, 1024)]
  assert growth[0] < memory[1] / memory[0] < growth[1], memory


def test_plan_cost_times_the_real_batch_shapes(tmp_path):
  """launch.plan_cost counts FLOPs and times steps on a made-up batch: it must have the keys,
  shapes and dtypes of the pipeline's own batches, or the plan would be of another model."""
  from configs import original  # pylint: disable=import-outside-toplevel
  from launch import plan_cost  # pylint: disable=import-outside-toplevel
  from tests import run_helpers  # pylint: disable=import-outside-toplevel
  from transformer import data  # pylint: disable=import-outside-toplevel
  config = original.get_config('tiny')
  config.update(run_helpers.overrides(str(tmp_path)), packing=True, vocab_size=300)
  real = next(data.make_train_iterator(config, data.get_tokenizer(config)))
  made = plan_cost.recipe_batch(config)
  assert {k: (v.shape, v.dtype) for k, v in made.items()} == {
      k: (v.shape, v.dtype) for k, v in real.items()}
  compile_s, step_s = plan_cost.time_steps(config, made, steps=1)
  assert compile_s > 0 and step_s > 0
