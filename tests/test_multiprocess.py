"""Several processes: 2 processes x 4 CPU devices train like 1 process x 8 devices.

Each process reads its own data shard, only process 0 writes metrics, parameters and optimizer
state are sharded over both (FSDP) and each writes its shards of a checkpoint; SIGTERM to one
process stops both at the same step (JAX's preemption sync service) with exit code 0, and the
restart resumes from there.
"""

import json
import os
import platform
import re
import signal
import subprocess
import sys

import pytest

from tests import run_helpers as rh
from transformer import distributed, train


def test_cluster_kind_from_environment():
  assert distributed.cluster_kind({}) is None
  assert distributed.cluster_kind({'JAX_COORDINATOR_ADDRESS': 'h:1'}) == 'env'
  slurm = dict(SLURM_JOB_ID='7', SLURM_STEP_NODELIST='n[1-2]', SLURM_NTASKS='16',
               SLURM_PROCID='3', SLURM_LOCALID='3')
  assert distributed.cluster_kind(slurm) == 'slurm'
  assert distributed.cluster_kind(dict(slurm, SLURM_NTASKS='1')) is None  # one task
  assert distributed.cluster_kind({'SLURM_JOB_ID': '7'}) is None  # inside sbatch, not srun
  assert distributed.cluster_kind({'OMPI_MCA_orte_hnp_uri': 'x', 'OMPI_COMM_WORLD_SIZE': '4'}) \
      == 'mpi'
  assert distributed.cluster_kind({'TPU_WORKER_HOSTNAMES': 'a,b'}) == 'tpu'


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='glibc only')
def test_glibc_accepts_every_malloc_setting():
  # In a fresh process: the settings stay with the process that makes them.
  code = 'from transformer import distributed; print(distributed.keep_freed_memory())'
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == 'True', out.stderr


@pytest.mark.parametrize('backend, cpu_only, events', [
    ('cpu', True, ['malloc', 'backend']),  # before XLA's threads allocate: where it pays
    ('cpu', False, ['backend', 'malloc']),  # an accelerator plugin is installed but not used
    ('gpu', False, ['backend']), ('tpu', False, ['backend'])])
def test_cpu_tuning_applies_on_the_cpu_backend_only(backend, cpu_only, events):
  """keep_host_memory's malloc settings serve XLA:CPU; a GPU or TPU run of the same config
  (its defaults ride along) must run with the platform's malloc."""
  code = f"""if True:
    import jax
    from transformer import distributed
    events = []
    distributed.keep_freed_memory = lambda: events.append('malloc') or True
    distributed.cpu_only_host = lambda: {cpu_only}
    jax.default_backend = lambda: events.append('backend') or {backend!r}
    print(distributed.initialize(num_cpu_devices=2, keep_host_memory=True), *events)"""
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=rh.ROOT)
  assert out.stdout.split() == [backend, *events], out.stderr


def test_explicit_arguments_are_checked():
  env = dict(JAX_COORDINATOR_ADDRESS='10.0.0.1:1234', JAX_NUM_PROCESSES='4', JAX_PROCESS_ID='2')
  assert distributed.explicit_arguments(env) == dict(
      coordinator_address='10.0.0.1:1234', num_processes=4, process_id=2)
  with pytest.raises(ValueError, match='JAX_PROCESS_ID is not'):
    distributed.explicit_arguments({k: v for k, v in env.items() if k != 'JAX_PROCESS_ID'})
  with pytest.raises(ValueError, match=r'JAX_PROCESS_ID=4 is not in \[0, JAX_NUM_PROCESSES=4\)'):
    distributed.explicit_arguments(dict(env, JAX_PROCESS_ID='4'))


def process_env(process_id: int, port: int) -> dict:
  xla_flags = os.environ['XLA_FLAGS'].replace('--xla_force_host_platform_device_count=8',
                                              '--xla_force_host_platform_device_count=4')
  assert 'device_count=4' in xla_flags
  return dict(XLA_FLAGS=xla_flags, JAX_PLATFORMS='cpu', JAX_NUM_PROCESSES='2',
              JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}', JAX_PROCESS_ID=str(process_id))


# One layer each side: a multi-process CPU program pays for every kernel at its first step.
# FSDP over all 8 devices: each process holds and writes half of every parameter.
SMALL = dict(num_layers=1, num_decoder_layers=1, mesh_data=1, mesh_fsdp=8)


def launch_two_processes(workdir, log_prefix, **config) -> tuple[list, list[str]]:
  port = rh.free_port()
  data_dir = rh.prepared_data_dir()
  # As the launch scripts do: one process prepares the token ids that both then read (two
  # processes preparing one split at once race on its partial folder).
  subprocess.run(rh.prepare_data_command(data_dir, **SMALL, **config), cwd=rh.ROOT, check=True,
                 capture_output=True)
  command = rh.main_command(workdir, data_dir, **SMALL, **config)
  logs = [f'{log_prefix}_{i}.log' for i in range(2)]
  return [rh.start(command, logs[i], process_env(i, port)) for i in range(2)], logs


def train_losses(workdir) -> list[tuple[int, float]]:
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    records = [json.loads(line) for line in f]
  return [(r['step'], r['train_loss']) for r in records if 'train_loss' in r]


@rh.needs_corpus
def test_two_processes_equal_one_and_stop_together_on_sigterm(tmp_path, monkeypatch):
  workdir = str(tmp_path / 'two_processes')
  # 1. Two processes; SIGTERM to process 1 only, once training runs.
  procs, logs = launch_two_processes(workdir, tmp_path / 'first', num_train_steps=40)
  rh.wait_for(rh.log_contains(logs[0], 'step 2/40'), procs, 'step 2 in the log of process 0')
  rh.send(procs[1], signal.SIGTERM)
  codes = rh.wait_all(procs)
  texts = [rh.read(p) for p in logs]
  assert codes == [0, 0], '\n'.join(t[-3000:] for t in texts)
  assert not any('Preparing token ids' in t for t in texts)  # prepare_data did it beforehand
  stops = [re.findall(r'Preempted \(SIGTERM\): saving step (\d+)', t) for t in texts]
  assert stops[0] and stops[0] == stops[1], stops  # both processes stop at the same step
  stop = int(stops[0][0])
  assert 2 <= stop < 40 and rh.committed_steps(workdir) == [stop]
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints', str(stop), 'data'))) == [
      'commit_success.txt', 'process_0-of-2.json', 'process_1-of-2.json']

  # 2. Both restart and resume from the preemption checkpoint.
  end = stop + 2
  procs, logs = launch_two_processes(workdir, tmp_path / 'second', num_train_steps=end)
  codes = rh.wait_all(procs)
  texts = [rh.read(p) for p in logs]
  assert codes == [0, 0], '\n'.join(t[-3000:] for t in texts)
  assert f'Resumed from {workdir}/checkpoints at step {stop}.' in texts[0]
  assert rh.committed_steps(workdir) == [stop, end]
  assert f'step {end}/{end}' in texts[0] and f'step {end}/{end}' not in texts[1]  # 0 logs alone

  # 3. One process with 8 devices reading both shards: the same losses and parameters.
  rh.emulate_processes(monkeypatch, 2)
  config = rh.make_config(rh.prepared_data_dir(), num_train_steps=end,
                          checkpoint_every_steps=stop, max_checkpoints_to_keep=100, **SMALL)
  reference = str(tmp_path / 'one_process')
  train.train_and_evaluate(config, reference)
  losses, reference_losses = train_losses(workdir), train_losses(reference)
  assert [step for step, _ in losses] == list(range(1, end + 1))  # written once, by process 0
  assert [step for step, _ in reference_losses] == list(range(1, end + 1))
  assert [x for _, x in losses] == pytest.approx([x for _, x in reference_losses], rel=1e-5)
  # Only the order of float sums differs (gloo across processes, in-process within one). Over up
  # to 41 steps that noise grows: Adam magnifies it where gradients are tiny, and a ReLU unit near
  # zero can flip (seen: one feed-forward unit's weights off by 4e-5). A wrong shard or dropout
  # mask moves parameters by the order of the learning rate (0.056 at its peak here) instead.
  for step in (stop, end):
    rh.assert_trees_equal(rh.restore_state(workdir, config, step).params,
                          rh.restore_state(reference, config, step).params,
                          rtol=1e-3, atol=5e-4)
