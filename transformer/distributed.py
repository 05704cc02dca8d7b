"""Multi-process start-up and agreement: JAX's multi-controller runtime, configured from the env.

Every process runs the same `python -m launch.main ...`. `initialize()` starts JAX's distributed
runtime when the environment describes several processes:

  - explicit (GPU clusters without a scheduler, several processes on one machine for testing):
    JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i on every process;
  - SLURM (`srun`, one task per GPU or per node) and Open MPI (`mpirun`): discovered by JAX;
  - Cloud TPU VMs (all workers of a slice) and GKE TPU pods: discovered by JAX.

A single process (no such environment) needs nothing. After it, jax.process_index() and
jax.process_count() drive the data shards (each process reads its own), the writer (process 0
only) and orbax (all processes write their shards of a checkpoint together).

`PreemptionNotice` turns SIGTERM or Ctrl-C into a stop at one step that every process agrees on.
"""

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import signal

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

_SLURM_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
               'SLURM_LOCALID')  # The ones JAX's SLURM detection reads: present inside `srun`.


def cluster_kind(env=None) -> str | None:
  """How this process learns its place in a multi-process run, or None for a single process.

  'env' (JAX_COORDINATOR_ADDRESS...), 'slurm', 'mpi', 'tpu' (GKE TPU pods, Cloud TPU VMs).
  """
  env = os.environ if env is None else env
  if 'JAX_COORDINATOR_ADDRESS' in env:
    return 'env'
  if all(v in env for v in _SLURM_VARS) and int(env['SLURM_NTASKS']) > 1:
    return 'slurm'  # A bare `sbatch`/`salloc` shell (no SLURM_STEP_*) is one process.
  if 'OMPI_MCA_orte_hnp_uri' in env and int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1:
    return 'mpi'
  if 'TPU_WORKER_HOSTNAMES' in env or 'MEGASCALE_COORDINATOR_ADDRESS' in env:
    return 'tpu'
  if env is os.environ and _on_cloud_tpu_vm():
    return 'tpu'
  return None


def _on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM (JAX found TPU chips and libtpu when it was imported)."""
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, 'running_in_cloud_tpu_vm', False))


def explicit_arguments(env=None) -> dict:
  """jax.distributed.initialize arguments from JAX_COORDINATOR_ADDRESS / _NUM_PROCESSES / _ID."""
  env = os.environ if env is None else env
  missing = [v for v in ('JAX_NUM_PROCESSES', 'JAX_PROCESS_ID') if v not in env]
  if missing:
    raise ValueError(f'JAX_COORDINATOR_ADDRESS is set but {" and ".join(missing)} is not: set '
                     'all three on every process (or none for a single process).')
  num_processes, process_id = int(env['JAX_NUM_PROCESSES']), int(env['JAX_PROCESS_ID'])
  if not 0 <= process_id < num_processes:
    raise ValueError(f'JAX_PROCESS_ID={process_id} is not in [0, JAX_NUM_PROCESSES='
                     f'{num_processes}).')
  return dict(coordinator_address=env['JAX_COORDINATOR_ADDRESS'], num_processes=num_processes,
              process_id=process_id)


_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters


def keep_freed_memory() -> bool:
  """Makes glibc's malloc reuse freed memory rather than hand it back to the OS.

  XLA:CPU mallocs every computation's buffers. By default glibc maps the large ones afresh (mmap,
  or a thread's heap, unmapped when it empties), so each train step faults its whole working set
  in again: original:small spent a fifth of its CPU time zeroing pages in the kernel. One arena,
  no mmap and no trimming keep the pages: 530 -> 400 ms per step. The costs: the process keeps
  its peak heap, and threads share one malloc lock (gpt_causal:small, whose buffers are small,
  runs 15% slower). Returns False without glibc (macOS, musl), where nothing changes.
  """
  try:
    libc = ctypes.CDLL('libc.so.6')
  except OSError:
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1))
  return all(libc.mallopt(param, value) == 1 for param, value in settings)


def keep_compiled_programs(directory: str):
  """JAX's persistent compilation cache in `directory` (empty: none), unless the environment
  names one (JAX_COMPILATION_CACHE_DIR): a command run again then reads its compiled programs."""
  if directory and not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(directory))


def initialize(num_cpu_devices: int = -1, keep_host_memory: bool = False) -> str:
  """Starts the distributed runtime when the environment describes several processes, then
  applies the CPU-only settings if the run computes on the CPU backend; returns that backend.

  Call once, before anything touches a device. The CPU-only settings are config.num_cpu_devices
  (> 0 splits the host CPU into that many JAX devices) and config.keep_host_memory
  (keep_freed_memory()): tuned for XLA:CPU, they would only cost a GPU or TPU run (malloc's
  one arena serialises the host threads that feed the accelerator), so there they are left out.
  """
  if num_cpu_devices > 0:  # read by the CPU client alone, and only when it is created: set now
    jax.config.update('jax_num_cpu_devices', num_cpu_devices)
  # malloc's settings pay only if made before XLA's threads start allocating: now, where the CPU
  # is the only backend JAX can start; else once the backend is known (they then help less).
  kept = keep_host_memory and cpu_only_host() and keep_freed_memory()
  kind = cluster_kind()
  if kind is not None:
    kwargs = explicit_arguments() if kind == 'env' else {}
    # Collectives between CPU devices of different processes (local multi-process runs, tests);
    # GPU and TPU devices have their own (NCCL, ICI) and ignore this.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(**kwargs)
    logging.info('Distributed (%s): process %d of %d; %d local / %d global devices; preemption '
                 'sync service %s.', kind, jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count(),
                 'on' if preemption_service_running() else 'off')
  backend = jax.default_backend()
  if backend != 'cpu':
    logging.info('Backend %s: the CPU-only settings (num_cpu_devices, keep_host_memory) are not '
                 'applied.', backend)
  elif keep_host_memory and not kept and not keep_freed_memory():
    logging.info('keep_host_memory: no glibc malloc here; left as it is.')
  return backend


def cpu_only_host() -> bool:
  """Whether JAX can start no backend but the CPU's, decided before any starts: JAX_PLATFORMS
  names only cpu, or no accelerator plugin (a jax_plugins package, libtpu) is installed."""
  platforms = (jax.config.jax_platforms or os.environ.get('JAX_PLATFORMS') or '').strip()
  if platforms:
    return platforms == 'cpu'
  if importlib.metadata.entry_points(group='jax_plugins'):
    return False
  if importlib.util.find_spec('libtpu') is not None:
    return False
  try:
    import jax_plugins  # pylint: disable=import-outside-toplevel
  except ImportError:
    return True
  return not list(pkgutil.iter_modules(jax_plugins.__path__))


def one_computation_at_a_time() -> bool:
  """Whether to wait for each computation before launching the next (several CPU devices).

  The devices of one CPU process exchange data through in-process collectives, and jaxlib 0.10's
  CPU client can deadlock when a computation is launched while the previous one waits in such a
  collective (seen with two devices: one thread waits in the all-reduce for a launch that waits
  for it; after 40 s XLA aborts the process). Waiting costs little: callers prepare the next
  batch first.
  """
  return jax.local_devices()[0].platform == 'cpu' and jax.local_device_count() > 1


def wait_before_launch(previous_outputs):
  """Call right before launching a computation: waits for `previous_outputs` where needed."""
  if one_computation_at_a_time():
    jax.block_until_ready(previous_outputs)


def preemption_service_running() -> bool:
  """Whether JAX's preemption sync service runs (jax.distributed.initialize starts it)."""
  try:
    from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  state = getattr(jax_distributed, 'global_state', None)
  return getattr(state, 'preemption_sync_manager', None) is not None


def all_processes(flag: bool) -> bool:
  """True iff `flag` is true on every process (a collective: all processes must call it)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.all(multihost_utils.process_allgather(np.int32(bool(flag)))))


def barrier(name: str):
  """Waits until every process gets here."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class Interrupted(KeyboardInterrupt):
  """Ctrl-C (SIGINT) stopped training after saving a checkpoint: launch.main exits with 130."""


class PreemptionNotice:
  """SIGTERM (a scheduler's preemption notice) or Ctrl-C (SIGINT) -> stop after the current step,
  on every process.

  Use as a context manager around the train loop and ask `reached(step)` after every step; all
  processes must ask at every step. True means: save a checkpoint at `step` and exit; `received`
  names the signal. A second Ctrl-C raises KeyboardInterrupt at once, saving nothing.

  - One process: a Python handler sets a flag, read at the next step.
  - Several processes with JAX's preemption sync service (started by jax.distributed.initialize,
    also on CPU): the service's own (C++) SIGTERM handler tells the coordinator, which picks the
    step at which all processes stop, whichever of them got the signal. No Python SIGTERM handler
    is installed: it would replace the service's and the notice would be lost. Ctrl-C is turned
    into a SIGTERM to this process, for the service to act on.
  - Several processes without the service (jax_enable_preemption_service=False): the Python flag
    is shared by an all-gather every `fallback_every` steps, so processes stop together at the
    first such step after the signal.
  """

  def __init__(self, fallback_every: int = 1):
    self.fallback_every = max(int(fallback_every), 1)
    self.received = None
    self._previous = {}

  def __enter__(self):
    self.received = None
    self.use_service = jax.process_count() > 1 and preemption_service_running()
    signals = (signal.SIGINT,) if self.use_service else (signal.SIGINT, signal.SIGTERM)
    self._previous = {s: signal.signal(s, self._handle) for s in signals}
    return self

  def __exit__(self, *exc_info):
    for s, previous in self._previous.items():
      signal.signal(s, previous)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.received == 'SIGINT':
      raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait for the save
    self.received = self.received or signal.Signals(signum).name
    if self.use_service:  # SIGINT: the service acts on SIGTERM only
      os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, step: int) -> bool:
    if self.use_service:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    if jax.process_count() == 1:
      return self.received is not None
    if step % self.fallback_every:
      return False
    return not all_processes(self.received is None)
