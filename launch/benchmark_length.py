r"""Train-step time and memory against sequence length, for each attention kind.

  python -m launch.benchmark_length --config=configs/gpt_causal.py:small \
      --lengths=256,512,1024,2048,4096,8192 --kinds=full,local --out=runs/length_scaling
  python -m launch.benchmark_length --config=configs/bert_mlm.py:small --config.packing=False \
      --kinds=full,local,strided,low_rank,lsh --out=runs/length_scaling_bert

The token budget per step is fixed (--tokens_per_step; batch = budget / length), so a kind whose
cost grows as L^2 shows it, and one that grows as L stays flat per token. For each (kind, length):
the median time of --steps train steps after --warmup_steps, and the temporary memory XLA plans
for the compiled step (activations, logits, gradients: `memory_analysis().temp_size_in_bytes`,
the same on every backend, without running it). Random token ids (speed and memory do not
depend on them). Writes OUT/length_scaling.md (a table) and OUT/length_scaling.png; prints the
float32 matmul peak measured in the same run.
"""

import os
import statistics
import time

import jax
import numpy as np
from absl import app, flags
from etils import epath
from matplotlib.figure import Figure
from ml_collections import config_flags

from transformer import (attention_kinds, distributed, optim, perf, precision, sharding, train,
                         variants)

VOCAB = 256


def compiled_step(config, length: int, tokens_per_step: int):
  """(compiled train step, state, batch, batch of host arrays) of config at `length`."""
  batch_size = max(1, tokens_per_step // length)
  config = config.copy_and_resolve_references()
  config.update(block_size=length, max_len=length, batch_size=batch_size)
  mesh = sharding.make_mesh(config, jax.devices()[:1])
  model = variants.build_model(config, VOCAB)
  optimizer = optim.make_optimizer(config)
  ids = np.random.default_rng(0).integers(4, VOCAB, (batch_size, length), dtype=np.int32)
  batch = dict(inputs=ids, targets=ids, weights=np.ones(ids.shape, np.float32))
  if config.num_token_types:
    batch['token_types'] = np.zeros_like(ids)
  _, shardings = train.abstract_state(model, optimizer, config, batch, mesh)
  state = train.create_state(model, optimizer, config, batch, shardings)
  step = train.jit_train_step(model, optimizer, config, mesh, shardings)
  device_batch = sharding.global_batch(batch, mesh)
  return step.lower(state, device_batch).compile(), state, device_batch, batch


def measure(config, length: int) -> dict:
  """Step time and planned temporary memory of config at `length`."""
  compiled, state, device_batch, batch = compiled_step(config, length,
                                                       flags.FLAGS.tokens_per_step)
  temp_bytes = compiled.memory_analysis().temp_size_in_bytes
  times = []
  for i in range(flags.FLAGS.warmup_steps + flags.FLAGS.steps):
    start = time.perf_counter()
    state, metrics = compiled(state, device_batch)
    jax.block_until_ready((state, metrics))
    if i >= flags.FLAGS.warmup_steps:
      times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  tokens = batch['inputs'].size
  flops = perf.train_step_flops(config, VOCAB, batch)
  return dict(batch=batch['inputs'].shape[0], step_ms=1000 * step_s,
              tokens_per_s=tokens / step_s, gflops_per_s=flops / step_s / 1e9,
              temp_mib=temp_bytes / 2 ** 20)


def write_plot(path: epath.Path, rows: list[dict]):
  fig = Figure(figsize=(10, 4))
  for ax, key, label in zip(fig.subplots(1, 2), ('step_ms', 'temp_mib'),
                            ('step time (ms)', 'temporary memory (MiB)')):
    for kind in dict.fromkeys(r['kind'] for r in rows):
      points = [(r['length'], r[key]) for r in rows if r['kind'] == kind]
      ax.plot(*zip(*points), marker='o', label=kind)
    ax.set(xscale='log', yscale='log', xlabel='sequence length (fixed tokens per step)',
           ylabel=label)
    ax.legend()
  fig.tight_layout()
  with path.open('wb') as f:
    fig.savefig(f, format='png', dpi=100)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  unknown = [kind for kind in flags.FLAGS.kinds if kind not in attention_kinds.KINDS]
  if unknown:
    raise app.UsageError(f'--kinds: {", ".join(unknown)} not in {", ".join(attention_kinds.KINDS)}')
  config = flags.FLAGS.config
  distributed.initialize(1, config.keep_host_memory)  # one device: no collectives in the way
  rows = []
  for kind in flags.FLAGS.kinds:
    for length in map(int, flags.FLAGS.lengths):
      config.attention_kind = kind
      row = dict(kind=kind, length=length, **measure(config, length))
      rows.append(row)
      print(f'{kind:>8} L={length:>5} batch {row["batch"]:>3}: {row["step_ms"]:9.1f} ms/step, '
            f'{row["tokens_per_s"]:9.0f} tokens/s, {row["temp_mib"]:8.1f} MiB temporary',
            flush=True)
  peak = precision.measure_matmul_peak()
  out = epath.Path(flags.FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  kinds = set(flags.FLAGS.kinds)
  window = (f', attention_window={config.attention_window}'
            if kinds & {'local', 'strided', 'lsh'} else '')
  if 'lsh' in kinds:
    window += f', lsh_buckets={config.lsh_buckets}, lsh_rounds={config.lsh_rounds}'
  lines = [f'{config.variant}:{config.size}, {flags.FLAGS.tokens_per_step} tokens per step'
           f'{window}; float32 matmul peak {peak / 1e9:.0f} GFLOP/s on {os.cpu_count()} CPU '
           f'core(s) ({jax.devices()[0].platform})', '',
           '| kind | length | batch | step (ms) | tokens/s | model GFLOP/s '
           '| temporary memory (MiB) |',
           '|---|---|---|---|---|---|---|']
  lines += [f'| {r["kind"]} | {r["length"]} | {r["batch"]} | {r["step_ms"]:.1f} | '
            f'{r["tokens_per_s"]:,.0f} | {r["gflops_per_s"]:.1f} | {r["temp_mib"]:,.1f} |'
            for r in rows]
  (out / 'length_scaling.md').write_text('\n'.join(lines) + '\n')
  write_plot(out / 'length_scaling.png', rows)
  print('\n'.join(lines))
  print(f'Wrote {out}/length_scaling.md and {out}/length_scaling.png')


def define_flags():
  """The command's flags (defined on running it, so that tests can import the module)."""
  config_flags.DEFINE_config_file('config', 'configs/gpt_causal.py:small',
                                  'A configs/VARIANT.py:SIZE file (a single-stack variant).',
                                  lock_config=False)
  flags.DEFINE_list('lengths', ['256', '512', '1024', '2048', '4096', '8192'], 'Sequence lengths.')
  flags.DEFINE_list('kinds', ['full', 'local'], 'Attention kinds (attention_kinds.KINDS).')
  flags.DEFINE_integer('tokens_per_step', 8192, 'Tokens per train step: batch = this / length.')
  flags.DEFINE_integer('steps', 3, 'Timed steps per point.')
  flags.DEFINE_integer('warmup_steps', 1, 'Untimed steps after compilation.')
  flags.DEFINE_string('out', 'runs/length_scaling', 'Folder for the table and the plot.')


if __name__ == '__main__':
  define_flags()
  app.run(main)
