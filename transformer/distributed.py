"""Multi-process start-up: JAX's own multi-controller runtime, configured from the environment.

On TPU VMs and SLURM/Open MPI clusters `jax.distributed.initialize()` discovers everything itself.
Elsewhere (a GPU cluster without SLURM, or several processes on one machine for testing) set
JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process.
A single process needs nothing.
"""

import os

import jax
from absl import logging

CLUSTER_ENV_VARS = ('JAX_COORDINATOR_ADDRESS', 'SLURM_JOB_ID', 'OMPI_COMM_WORLD_SIZE',
                    'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS')


def initialize():
  """Starts the distributed runtime when the environment describes several processes."""
  env = os.environ
  if not any(v in env for v in CLUSTER_ENV_VARS):
    return
  kwargs = {}
  if 'JAX_COORDINATOR_ADDRESS' in env:
    kwargs = dict(coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
                  num_processes=int(env['JAX_NUM_PROCESSES']),
                  process_id=int(env['JAX_PROCESS_ID']))
    # Cross-process collectives between CPU devices (local multi-process runs and tests).
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)
  logging.info('Process %d of %d; %d local / %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
