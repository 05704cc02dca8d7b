r"""Train-step speed of a config on this machine: step time, tokens/s, MFU, compile time, memory.

  python -m launch.benchmark --config=configs/gpt_causal.py:small
  python -m launch.benchmark --config=configs/original.py:small --steps=30

Batches are real ones from the config's pipeline, fetched and placed on the devices before timing,
so the numbers are of the step alone. MFU = analytic matmul FLOPs (attention included, backward =
2 x forward; see transformer/perf.py) per second / the matmul peak of the config's dtype measured
in this same run (float32 and bfloat16 peaks are both printed).
The last line printed is one JSON object.
"""

import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from transformer import data, distributed, perf, precision, sharding, train

config_flags.DEFINE_config_file('config', None, 'A configs/VARIANT.py:SIZE file.',
                                lock_config=True)
flags.DEFINE_integer('steps', 40, 'Timed train steps (after compilation and warmup).')
flags.DEFINE_integer('warmup_steps', 30, 'Untimed steps after compilation (on CPU the first ~20 '
                     'steps of a small model run about 25% slower).')
flags.mark_flags_as_required(['config'])


def peak_memory_bytes() -> int:
  """Peak device memory where the backend reports it, else the process's peak resident set."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use'])
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  config = flags.FLAGS.config
  distributed.initialize(config.num_cpu_devices, config.keep_host_memory)
  num_steps, warmup = flags.FLAGS.steps, flags.FLAGS.warmup_steps
  exp = train.Experiment(config)
  iterator = data.make_train_iterator(config, exp.tokenizer)
  local_batches = [next(iterator) for _ in range(num_steps + warmup + 1)]
  batches = [sharding.global_batch(b, exp.mesh) for b in local_batches]
  _, shardings = exp.abstract_state()
  state = train.create_state(exp.model, exp.optimizer, config, local_batches[0], shardings)
  step_fn = train.jit_train_step(exp.model, exp.optimizer, config, exp.mesh, shardings)

  start = time.perf_counter()
  compiled = step_fn.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - start
  for batch in batches[:warmup + 1]:
    distributed.wait_before_launch(state)  # as the training loop does
    state, _ = compiled(state, batch)
  jax.block_until_ready(state)

  timed = batches[warmup + 1:]
  start = time.perf_counter()
  for batch in timed:
    distributed.wait_before_launch(state)
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - start) / len(timed)

  vocab = exp.tokenizer.vocab_size
  timed_local = local_batches[warmup + 1:]
  tokens = np.mean([sum(np.count_nonzero(b[k]) for k in ('inputs', 'decoder_inputs') if k in b)
                    for b in timed_local])
  flops = np.mean([perf.train_step_flops(config, vocab, b) for b in timed_local])
  peaks = {name: precision.measure_matmul_peak(dtype=jnp.dtype(name))
           for name in ('float32', 'bfloat16')}
  dtype = precision.compute_dtype(config.dtype).name
  peak = peaks[dtype]  # MFU against the peak of the dtype that ran
  params = sum(x.size for x in jax.tree.leaves(state.params))
  result = dict(config=f'{config.variant}:{config.size}', params=int(params),
                devices=jax.device_count(), platform=jax.devices()[0].platform,
                batch_shapes={k: list(v.shape) for k, v in local_batches[0].items()},
                compile_s=round(compile_s, 2), step_ms=round(1000 * step_s, 2),
                tokens_per_s=round(float(tokens) / step_s, 1),
                model_gflops_per_s=round(flops / step_s / 1e9, 2),
                dtype=dtype,
                peak_gflops={name: round(p / 1e9, 2) for name, p in peaks.items()},
                mfu=round(flops / step_s / peak, 4),
                peak_memory_mb=round(peak_memory_bytes() / 2 ** 20, 1))
  print(f'{result["config"]}: {result["params"]:,} parameters, {result["step_ms"]} ms/step, '
        f'{result["tokens_per_s"]:,} tokens/s, {result["model_gflops_per_s"]} GFLOP/s of '
        f'{peak / 1e9:.2f} measured {result["dtype"]} matmul peak (MFU {result["mfu"]:.1%}; '
        f'float32 peak {result["peak_gflops"]["float32"]}, bfloat16 '
        f'{result["peak_gflops"]["bfloat16"]}), compile {result["compile_s"]} s')
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
