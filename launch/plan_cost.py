r"""What a recipe costs, from the code's own FLOP count: FLOPs per step and in all, and the wall time
and chip-hours on common accelerators at a stated MFU; optionally, steps timed on this machine.

  python -m launch.plan_cost --config=configs/original.py:base --config.dataset=wmt14 \
      --config.vocab_size=37000 --config.packing=True --config.batch_size=208 \
      --config.max_source_len=128 --config.max_target_len=128 --mfu=0.4 --measure_steps=2

FLOPs are perf.train_step_flops of one batch of the recipe's padded shape (matmuls and attention;
backward = 2 x forward), as the benchmarks' MFU counts them. Accelerator peaks are the vendors'
dense bfloat16 figures; --mfu is an assumption, and the paper's own run gives a reference: its
implied MFU is printed from its 12 hours on 8 P100 for 100k base steps. --measure_steps times
train steps on this machine with random token ids of the recipe's shape (no data needed).
"""

import time

from absl import app, flags
import jax
import numpy as np
from ml_collections import config_flags

from transformer import distributed, optim, perf, precision, sharding, train, variants
from transformer.data import pipelines

# name: (chips, dense bfloat16 peak FLOP/s per chip, from the vendor's data sheet).
ACCELERATORS = {
    'TPU v4-8': (4, 275e12),
    'TPU v5e-8': (8, 197e12),
    '8 x H100 SXM': (8, 989e12),
}
# The paper (Vaswani et al. 2017, section 5.2): base, 100k steps in 12 hours on 8 P100 GPUs
# (21.2 TFLOP/s float16 each, NVIDIA's P100 SXM2 data sheet).
PAPER = dict(steps=100_000, hours=12.0, chips=8, peak=21.2e12)


def recipe_batch(config) -> dict:
  """A batch of the recipe's padded shapes (ids are random: only shapes count for FLOPs)."""
  rng = np.random.default_rng(0)
  batch = {}
  for key, length in pipelines.sequence_lengths(config).items():
    if key == 'weights':
      batch[key] = np.ones((config.batch_size, length), np.float32)
    else:
      batch[key] = rng.integers(8, config.vocab_size, (config.batch_size, length), np.int32)
  if config.packing:
    for prefix, key in (('inputs', 'inputs'), ('decoder', 'decoder_inputs')):
      if key in batch:
        batch[f'{prefix}_segment_ids'] = np.ones_like(batch[key])
        batch[f'{prefix}_positions'] = np.broadcast_to(np.arange(batch[key].shape[1], dtype=np.int32),
                                                       batch[key].shape).copy()
  return batch


def time_steps(config, batch: dict, steps: int) -> tuple[float, float]:
  """(compile s, mean s per step) of `steps` train steps on this machine."""
  mesh = sharding.make_mesh(config)
  model = variants.build_model(config, config.vocab_size)
  optimizer = optim.make_optimizer(config)
  _, shardings = train.abstract_state(model, optimizer, config, batch, mesh)
  state = train.create_state(model, optimizer, config, batch, shardings)
  global_batch = sharding.global_batch(batch, mesh)
  start = time.perf_counter()
  compiled = train.jit_train_step(model, optimizer, config, mesh, shardings).lower(
      state, global_batch).compile()
  compile_s = time.perf_counter() - start
  state, _ = compiled(state, global_batch)  # One untimed step.
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, global_batch)
  jax.block_until_ready((state, metrics))
  return compile_s, (time.perf_counter() - start) / steps


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  config, mfu = flags.FLAGS.config, flags.FLAGS.mfu
  batch = recipe_batch(config)
  step_flops = perf.train_step_flops(config, config.vocab_size, batch)
  total = step_flops * config.num_train_steps
  shapes = ', '.join(f'{k} {v.shape}' for k, v in batch.items() if k in ('inputs',
                                                                          'decoder_inputs'))
  print(f'{config.variant}:{config.size} dataset={config.dataset} vocab={config.vocab_size} '
        f'batch: {shapes}; {config.num_train_steps:,} steps')
  print(f'train step: {step_flops / 1e12:.2f} TFLOP; recipe: {total / 1e18:.2f} EFLOP')
  paper_mfu = PAPER['steps'] * step_flops / (PAPER['hours'] * 3600 * PAPER['chips'] *
                                              PAPER['peak'])
  print(f'the paper: {PAPER["steps"]:,} steps in {PAPER["hours"]:.0f} h on {PAPER["chips"]} P100 '
        f'= {paper_mfu:.1%} MFU at this batch shape')
  prices = [float(p) for p in flags.FLAGS.prices]
  if prices and len(prices) != len(ACCELERATORS):
    raise app.UsageError(f'--prices needs {len(ACCELERATORS)} values: {", ".join(ACCELERATORS)}.')
  print(f'\n| accelerator | chips | peak bf16 PFLOP/s | wall time at {mfu:.0%} MFU | chip-hours |' +
        (' cost |' if prices else ''))
  print('|---|---|---|---|---|' + ('---|' if prices else ''))
  for i, (name, (chips, peak)) in enumerate(ACCELERATORS.items()):
    hours = total / (chips * peak * mfu) / 3600
    cost = f' {hours * chips * prices[i]:,.2f} |' if prices else ''
    print(f'| {name} | {chips} | {chips * peak / 1e15:.2f} | {hours:.2f} h | {hours * chips:.1f} |'
          + cost)
  if flags.FLAGS.measure_steps:
    distributed.initialize(config.num_cpu_devices, config.keep_host_memory)
    dtype = precision.compute_dtype(config.dtype)
    peak = precision.measure_matmul_peak(dtype=dtype)
    compile_s, step_s = time_steps(config, batch, flags.FLAGS.measure_steps)
    device = jax.devices()[0]
    print(f'\nthis machine ({jax.device_count()} x {device.device_kind}, {dtype.name} matmul '
          f'peak {peak / 1e9:,.0f} GFLOP/s measured): compile {compile_s:.0f} s, '
          f'{step_s:.1f} s/step = {step_flops / step_s / peak:.1%} MFU; the recipe would take '
          f'{step_s * config.num_train_steps / 86400:,.0f} days here.')


def define_flags():
  """The command's flags (defined on running it, so that tests can import the module)."""
  config_flags.DEFINE_config_file('config', None, 'A configs/VARIANT.py:SIZE file.',
                                  lock_config=True)
  flags.DEFINE_float('mfu', 0.3, 'Assumed model FLOPs utilization on the accelerators.')
  flags.DEFINE_integer('measure_steps', 0, 'Train steps to time on this machine (0: none).')
  flags.DEFINE_list('prices', [], 'Price per chip-hour of each accelerator, in the order of '
                    'ACCELERATORS (yours: prices differ by provider, region and date).')
  flags.mark_flags_as_required(['config'])


if __name__ == '__main__':
  define_flags()
  app.run(main)
