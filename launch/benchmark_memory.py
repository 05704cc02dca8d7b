r"""Per-device bytes of parameters and optimizer state: replicated (data parallel) vs FSDP.

  python -m launch.benchmark_memory --config=configs/original.py:small
  python -m launch.benchmark_memory --config=configs/original.py:big --materialize=false

For each mesh, the train state is created directly into its shardings (as training does) and the
bytes of the shards each device holds are summed; --materialize=false computes the same from the
shardings alone, allocating nothing (for models too large for this machine). On CPU, --devices
fake devices stand in for accelerators. The vocabulary is config.vocab_size (no data needed).
"""

import os
import sys


def _fake_cpu_devices(argv) -> int:
  """--devices=N from argv (default 8), set as XLA's host device count before JAX starts."""
  count = 8
  for arg in argv:
    if arg.startswith('--devices='):
      count = int(arg.split('=', 1)[1])
  flags = os.environ.get('XLA_FLAGS', '')
  if '--xla_force_host_platform_device_count' not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={count}'.strip()
  return count


_fake_cpu_devices(sys.argv)

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from transformer import optim, sharding, train, variants  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'A configs/VARIANT.py:SIZE file.',
                                lock_config=False)
flags.DEFINE_integer('devices', 8, 'Fake CPU devices (on CPU only; set before JAX starts).')
flags.DEFINE_list('meshes', ['replicated', 'fsdp', 'fsdp_tensor'],
                  'Meshes to compare: replicated (data=N), fsdp (fsdp=N), fsdp_tensor '
                  '(fsdp=N/2, tensor=2).')
flags.DEFINE_bool('materialize', True, 'Create the state on the devices and measure its shards '
                  '(else: compute from the shardings, allocating nothing).')
flags.mark_flags_as_required(['config'])

MESHES = {'replicated': lambda n: dict(mesh_data=n, mesh_fsdp=1, mesh_tensor=1),
          'fsdp': lambda n: dict(mesh_data=1, mesh_fsdp=n, mesh_tensor=1),
          'fsdp_tensor': lambda n: dict(mesh_data=1, mesh_fsdp=n // 2, mesh_tensor=2)}


def bytes_per_device(tree, devices, materialized: bool) -> np.ndarray:
  """Bytes of `tree` held by each device: measured shards, or shard shapes from shardings."""
  total = np.zeros(len(devices), np.int64)
  index = {d: i for i, d in enumerate(devices)}
  for leaf in jax.tree.leaves(tree):
    if materialized:
      for shard in leaf.addressable_shards:
        total[index[shard.device]] += shard.data.nbytes
    else:
      shard_bytes = int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
      for device in leaf.sharding.device_set:
        total[index[device]] += shard_bytes
  return total


def measure(config, vocab_size: int, mesh_name: str, materialize: bool) -> dict:
  n = jax.device_count()
  config = config.copy_and_resolve_references()
  config.update(MESHES[mesh_name](n))
  mesh = sharding.make_mesh(config)
  model = variants.build_model(config, vocab_size)
  optimizer = optim.make_optimizer(config)
  batch = variants.example_batch(config)
  abstract, shardings = train.abstract_state(model, optimizer, config, batch, mesh)
  state = (train.create_state(model, optimizer, config, batch, shardings) if materialize
           else abstract)
  devices = list(mesh.devices.flat)
  params = bytes_per_device(state.params, devices, materialize)
  opt = bytes_per_device(state.opt_state, devices, materialize)
  total_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract.params))
  out = dict(mesh=mesh_name, shape=dict(mesh.shape), params=params, opt=opt,
             params_total=total_bytes,
             num_params=sum(x.size for x in jax.tree.leaves(abstract.params)))
  if materialize:
    del state
  return out


def mib(x) -> str:
  return f'{x / 2**20:8.2f}'


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  config = flags.FLAGS.config
  vocab_size = config.vocab_size
  n = jax.device_count()
  print(f'{config.variant}:{config.size}  d_model={config.d_model}  vocab={vocab_size}  '
        f'{n} {jax.devices()[0].platform} devices  '
        f'({"measured shards" if flags.FLAGS.materialize else "from shardings"})')
  print(f'{"mesh":<12} {"data x fsdp x tensor":<21} {"params MiB":>10} {"opt MiB":>9} '
        f'{"total MiB":>10} {"vs replicated":>13}   (per device: max over devices)')
  baseline = None
  for name in flags.FLAGS.meshes:
    r = measure(config, vocab_size, name, flags.FLAGS.materialize)
    per_device = r['params'] + r['opt']
    worst = int(per_device.max())
    baseline = baseline or worst
    shape = ' x '.join(str(r['shape'][a]) for a in sharding.AXES)
    print(f'{name:<12} {shape:<21} {mib(r["params"].max()):>10} {mib(r["opt"].max()):>9} '
          f'{mib(worst):>10} {worst / baseline:>12.3f}x')
  print(f'{r["num_params"]:,} parameters = {r["params_total"] / 2**20:.2f} MiB float32; with '
        f'Adam (mu, nu) the state is about 3x that. Ideal full sharding: 1/{n} = {1 / n:.3f}x.')


if __name__ == '__main__':
  app.run(main)
