r"""Train-step speed of this project against its peers, side by side, at four fixed shapes.

  python -m launch.benchmark_peers --nanogpt_dir=../peers/nanoGPT \
      --flax_wmt_dir=../peers/flax/examples/wmt --data_dir=/tmp/peers_data
  python -m launch.benchmark_peers --shapes=encdec,bert --steps=10 --warmup_steps=5

One machine, one sitting, one measurement at a time (each in its own process):
  gpt_char  GPT 4 layers x 128 wide, 64 characters x 12 rows (gpt_causal:small as is)
            vs nanoGPT's train.py (shakespeare_char, same dims, no dropout)
  gpt_384   GPT 6 layers x 384 wide, d_ff 1536, 256 characters x 16 rows
            vs nanoGPT's train.py (eager; --nanogpt_compile adds torch.compile at both GPT
            shapes)
  encdec    encoder-decoder 3+3 layers x 256 wide, 8k joint vocabulary, 128 x (24 + 24) tokens,
            dropout 0.1 (original:small_paper, unpacked) vs Hugging Face MarianMTModel and flax's
            examples/wmt Transformer
  bert      BERT 4 layers x 256 wide, 64 rows x 128 tokens (bert_mlm:small, rows of 128)
            vs Hugging Face BertForMaskedLM
This project runs launch.benchmark twice per shape (float32, then bfloat16 matmul inputs) on its
real batches; the peers run float32 on random token ids (no padding), their baseline. Every
ms/step is the mean over --steps timed steps after --warmup_steps untimed ones (nanoGPT: the mean
of the per-iteration times its train.py prints, which include its batch sampling). tokens/s counts
the non-padding input tokens of a step (encdec: source + decoder inputs); ratio = the fastest
peer's float32 ms/step / this row's (above 1: faster than every peer). The float32 and bfloat16
matmul peaks measured by this project's float32 run are printed per shape. Prints a markdown table,
then one JSON object per measurement.

The peers are not part of this project; check them out yourself and pass their folders:
  git clone https://github.com/karpathy/nanoGPT ../peers/nanoGPT
  git clone https://github.com/google/flax ../peers/flax
nanoGPT's shakespeare_char data is prepared in its checkout on first use (from this machine's copy
of Tiny Shakespeare where there is one). Of flax's example only models.py is imported (its
train.py needs TensorFlow); its train step is restated here as its train.py writes it.
The Hugging Face peers import torch and transformers (requirements-interop.txt), which training
never uses; their models are built from config objects with random weights, nothing downloaded.
"""

import concurrent.futures
import importlib.util
import json
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

import numpy as np
from absl import app, flags

from configs import common

PROJECT = 'this project'
VOCAB = common.base_config().vocab_size  # The joint sentencepiece vocabulary of encdec and bert.
# encdec and bert dims, for the peers (this project's side is its configs, below).
ENCDEC = dict(d_model=256, layers=3, heads=4, d_ff=1024, batch=128, source_len=24, target_len=24,
              dropout=0.1)
BERT = dict(d_model=256, layers=4, heads=4, d_ff=1024, batch=64, length=128, dropout=0.1)


class Shape(NamedTuple):
  config: str  # configs/VARIANT.py:SIZE
  overrides: dict  # --config.FIELD=VALUE
  nanogpt: dict | None = None  # nanoGPT's train.py flags for the same model, if it has one.


SHAPES = {
    'gpt_char': Shape('configs/gpt_causal.py:small', {},
                      dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12)),
    'gpt_384': Shape('configs/gpt_causal.py:small',
                     dict(num_layers=6, num_heads=6, d_model=384, d_ff=1536, block_size=256,
                          max_len=256, batch_size=16),
                     dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=16)),
    'encdec': Shape('configs/original.py:small_paper',
                    dict(packing=False, batch_size=ENCDEC['batch'],
                         max_source_len=ENCDEC['source_len'], max_target_len=ENCDEC['target_len'])),
    'bert': Shape('configs/bert_mlm.py:small',
                  dict(block_size=BERT['length'], max_len=BERT['length'])),
}

flags.DEFINE_list('shapes', list(SHAPES), f'Shapes to time: {", ".join(SHAPES)}.')
flags.DEFINE_string('nanogpt_dir', '', 'A nanoGPT checkout (empty: nanoGPT is skipped).')
flags.DEFINE_string('flax_wmt_dir', '', "flax's examples/wmt folder (empty: skipped).")
flags.DEFINE_integer('steps', 40, 'Timed train steps of every implementation.')
flags.DEFINE_integer('warmup_steps', 30, 'Untimed steps before them (after compilation).')
flags.DEFINE_string('data_dir', '', "This project's prepared data (config.data_dir), prepared "
                    "there on first use; empty: the configs' own data_dir.")
flags.DEFINE_bool('nanogpt_compile', False, 'Also time nanoGPT with torch.compile.')


def run_command(args: list[str], cwd: str, env: dict | None = None) -> str:
  """stdout of a command run to completion; its output is shown only when it fails."""
  done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, check=False)
  if done.returncode:
    sys.stderr.write(done.stdout[-3000:] + done.stderr[-6000:])
    raise RuntimeError(f'{" ".join(args)} (in {cwd}) exited with {done.returncode}.')
  return done.stdout


def in_fresh_process(fn, *args):
  """fn(*args) in a new interpreter, so no peer's thread pools (torch's OpenMP threads spin after
  their work) or allocator state carry into the next measurement."""
  context = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
    return pool.submit(fn, *args).result()


def project_run(shape: Shape, dtype: str, steps: int, warmup: int, data_dir: str) -> dict:
  """This project's launch.benchmark at shape, matmul inputs in dtype; its JSON, abridged."""
  overrides = dict(shape.overrides, dtype=dtype)
  if data_dir:
    overrides['data_dir'] = data_dir
  args = [sys.executable, '-m', 'launch.benchmark', f'--config={shape.config}',
          *(f'--config.{k}={v}' for k, v in overrides.items()),
          f'--steps={steps}', f'--warmup_steps={warmup}']
  stdout = run_command(args, common.REPO_ROOT, dict(os.environ, PYTHONPATH=common.REPO_ROOT))
  result = json.loads(stdout.strip().splitlines()[-1])
  assert result['dtype'] == dtype, result  # The override reached the step.
  keep = ('step_ms', 'tokens_per_s', 'params', 'mfu', 'peak_gflops', 'compile_s', 'batch_shapes')
  return dict({k: result[k] for k in keep},
              tokens_per_step=round(result['tokens_per_s'] * result['step_ms'] / 1000, 1))


def prepare_nanogpt_data(nanogpt_dir: str):
  """nanoGPT's shakespeare_char train.bin/val.bin/meta.pkl. Its prepare.py downloads input.txt
  only when it is missing, so the local copy of the same text goes there first."""
  folder = os.path.join(nanogpt_dir, 'data', 'shakespeare_char')
  if all(os.path.exists(os.path.join(folder, f)) for f in ('train.bin', 'val.bin', 'meta.pkl')):
    return
  local_text = os.path.join(common.SHARED_DATA, 'tinyshakespeare', 'input.txt')
  text = os.path.join(folder, 'input.txt')
  if os.path.exists(local_text) and not os.path.exists(text):
    shutil.copyfile(local_text, text)
  run_command([sys.executable, 'prepare.py'], folder)


def nanogpt_peer(nanogpt_dir: str, dims: dict, compile_model: bool, steps: int,
                 warmup: int) -> dict:
  """nanoGPT's own train.py on CPU in float32, no dropout; the mean of its per-iteration times.

  Its iteration 0 also runs its first evaluation (eval_iters=1), so at least one iteration is
  skipped; no later evaluation runs, so it saves no checkpoint, but it makes its out_dir: a
  temporary one. --dtype=float32 says what runs anyway (on CPU its default float16 autocasts
  nothing).
  """
  prepare_nanogpt_data(nanogpt_dir)
  warmup = max(warmup, 1)
  last_iter = warmup + steps - 1  # train.py runs iterations 0..max_iters.
  with tempfile.TemporaryDirectory() as out_dir:
    args = [sys.executable, 'train.py', 'config/train_shakespeare_char.py', '--device=cpu',
            '--dtype=float32', f'--compile={compile_model}', '--dropout=0.0',
            *(f'--{k}={v}' for k, v in dims.items()),
            f'--max_iters={last_iter}', f'--lr_decay_iters={last_iter}',
            f'--eval_interval={last_iter + 1}', '--eval_iters=1', '--log_interval=1',
            '--always_save_checkpoint=False', f'--out_dir={out_dir}']
    # train.py leaves torch's thread count alone; every core, as for the other peers.
    stdout = run_command(args, nanogpt_dir, dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count())))
  lines = re.findall(r'^iter (\d+): .*time ([\d.]+)ms', stdout, re.MULTILINE)
  times = [float(ms) for it, ms in lines if int(it) >= warmup]
  assert len(times) == steps, stdout[-2000:]
  return dict(step_ms=statistics.mean(times),
              tokens_per_step=dims['batch_size'] * dims['block_size'])


def random_ids(shape: tuple[int, ...], seed: int) -> np.ndarray:
  """Token ids in [1, VOCAB): none is padding (id 0 for every peer here)."""
  return np.random.default_rng(seed).integers(1, VOCAB, shape)


def start_torch():
  """torch with every core, seeded."""
  import torch
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  return torch


def time_torch_steps(torch, model, optimizer, loss_fn, steps: int, warmup: int) -> float:
  """Mean ms of a float32 train step: forward, loss, backward, clip at 1.0 (this project's and
  the Hugging Face Trainer's default), AdamW update."""

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss_fn().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()

  model.train()  # dropout on
  for _ in range(warmup):
    step()
  start = time.perf_counter()
  for _ in range(steps):
    step()
  return 1000 * (time.perf_counter() - start) / steps


def marian_model():
  """Hugging Face MarianMTModel at encdec's dims, random init."""
  from transformers import MarianConfig, MarianMTModel
  d = ENCDEC
  return MarianMTModel(MarianConfig(
      vocab_size=VOCAB, d_model=d['d_model'], encoder_layers=d['layers'],
      decoder_layers=d['layers'], encoder_attention_heads=d['heads'],
      decoder_attention_heads=d['heads'], encoder_ffn_dim=d['d_ff'], decoder_ffn_dim=d['d_ff'],
      dropout=d['dropout'], attention_dropout=0.0, activation_dropout=0.0,
      activation_function='relu', scale_embedding=True, max_position_embeddings=64,
      pad_token_id=0, decoder_start_token_id=2, eos_token_id=3, forced_eos_token_id=3))


def bert_model():
  """Hugging Face BertForMaskedLM at bert's dims, random init."""
  from transformers import BertConfig, BertForMaskedLM
  d = BERT
  return BertForMaskedLM(BertConfig(
      vocab_size=VOCAB, hidden_size=d['d_model'], num_hidden_layers=d['layers'],
      num_attention_heads=d['heads'], intermediate_size=d['d_ff'],
      hidden_act='gelu_pytorch_tanh', hidden_dropout_prob=d['dropout'],
      attention_probs_dropout_prob=0.0, max_position_embeddings=d['length']))


def marian_peer(steps: int, warmup: int) -> dict:
  """Hugging Face MarianMTModel at encdec's dims, random init; cross-entropy with label smoothing
  0.1 on its logits (its own loss has none). Activation relu and no attention dropout, as this
  project; Marian keeps its biases on the attention projections and its final_logits_bias."""
  torch = start_torch()
  d = ENCDEC
  model = marian_model()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9,
                                weight_decay=0.0)
  source, decoder_inputs, targets = (
      torch.from_numpy(random_ids((d['batch'], length), seed))
      for seed, length in enumerate((d['source_len'], d['target_len'], d['target_len'])))

  def loss_fn():
    logits = model(input_ids=source, decoder_input_ids=decoder_inputs, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                             label_smoothing=0.1)

  return dict(step_ms=time_torch_steps(torch, model, optimizer, loss_fn, steps, warmup),
              tokens_per_step=d['batch'] * (d['source_len'] + d['target_len']),
              params=sum(p.numel() for p in model.parameters()))


def bert_peer(steps: int, warmup: int) -> dict:
  """Hugging Face BertForMaskedLM at bert's dims, random init; labels on 15% of the positions
  (-100 elsewhere), its own cross-entropy. gelu_tanh and no attention dropout, as this project."""
  torch = start_torch()
  d = BERT
  model = bert_model()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6,
                                weight_decay=0.01)
  ids = torch.from_numpy(random_ids((d['batch'], d['length']), 0))
  labels = torch.where(torch.rand(ids.shape) < 0.15, ids, -100)

  def loss_fn():
    return model(input_ids=ids, labels=labels).loss

  return dict(step_ms=time_torch_steps(torch, model, optimizer, loss_fn, steps, warmup),
              tokens_per_step=d['batch'] * d['length'],
              params=sum(p.numel() for p in model.parameters()))


def flax_wmt_peer(wmt_dir: str, steps: int, warmup: int) -> dict:
  """flax's examples/wmt Transformer (its models.py) at encdec's dims, with the train step of its
  train.py: label-smoothed (0.1) weighted cross-entropy, metrics, its rsqrt schedule, optax adamw
  (b2 0.98, eps 1e-9, weight decay 0.0: configs/default.py), dropout on; jitted on JAX's default
  CPU device (train.py's pmap over one device). Timed like launch.benchmark."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import linen as nn
  from flax.training import common_utils, train_state
  spec = importlib.util.spec_from_file_location('flax_wmt_models',
                                                os.path.join(wmt_dir, 'models.py'))
  models = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(models)
  d = ENCDEC
  config = models.TransformerConfig(  # As train.py builds it from configs/default.py.
      vocab_size=VOCAB, output_vocab_size=VOCAB, share_embeddings=True,
      logits_via_embedding=True, dtype=jnp.float32, emb_dim=d['d_model'], num_heads=d['heads'],
      num_layers=d['layers'], qkv_dim=d['d_model'], mlp_dim=d['d_ff'], max_len=256,
      dropout_rate=d['dropout'], attention_dropout_rate=d['dropout'], deterministic=False,
      decode=False, kernel_init=nn.initializers.xavier_uniform(),
      bias_init=nn.initializers.normal(stddev=1e-6))
  base_rate, warmup_steps = 0.002, 1000
  schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, base_rate, warmup_steps),
       lambda count: base_rate * (count + warmup_steps) ** -0.5 * warmup_steps ** 0.5],
      [warmup_steps])

  def cross_entropy(logits, targets, weights, label_smoothing):  # compute_weighted_cross_entropy
    vocab = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low = (1.0 - confidence) / (vocab - 1)
    normalizing = -(confidence * jnp.log(confidence) + (vocab - 1) * low * jnp.log(low + 1e-20))
    soft = common_utils.onehot(targets, vocab, on_value=confidence, off_value=low)
    loss = -jnp.sum(soft * nn.log_softmax(logits), axis=-1) - normalizing
    return (loss * weights).sum(), weights.sum()

  def train_step(state, inputs, targets, dropout_rng):
    weights = jnp.where(targets > 0, 1, 0).astype(jnp.float32)
    dropout_rng = jax.random.fold_in(dropout_rng, state.step)

    def loss_fn(params):
      logits = models.Transformer(config).apply({'params': params}, inputs, targets,
                                                rngs={'dropout': dropout_rng})
      loss, weight_sum = cross_entropy(logits, targets, weights, 0.1)
      return loss / weight_sum, logits

    (_, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    loss, denominator = cross_entropy(logits, targets, weights, 0.0)  # compute_metrics
    accuracy = (jnp.equal(jnp.argmax(logits, axis=-1), targets) * weights).sum()
    metrics = dict(loss=loss, accuracy=accuracy, denominator=denominator,
                   learning_rate=schedule(state.step))
    return state.apply_gradients(grads=grads), metrics

  inputs = jnp.asarray(random_ids((d['batch'], d['source_len']), 0))
  targets = jnp.asarray(random_ids((d['batch'], d['target_len']), 1))
  model = models.Transformer(config.replace(deterministic=True))
  params = jax.jit(model.init)(jax.random.key(0), inputs, targets)['params']
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adamw(
      schedule, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.0))
  rng = jax.random.key(1)
  step = jax.jit(train_step, donate_argnums=0).lower(state, inputs, targets, rng).compile()
  for _ in range(warmup + 1):
    state, metrics = step(state, inputs, targets, rng)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, inputs, targets, rng)
  jax.block_until_ready((state, metrics))
  return dict(step_ms=1000 * (time.perf_counter() - start) / steps,
              tokens_per_step=d['batch'] * (d['source_len'] + d['target_len']),
              params=int(sum(np.size(x) for x in jax.tree.leaves(state.params))))


def peers(name: str, shape: Shape) -> dict:
  """{implementation: () -> measurement} of the peers of shape that the flags make available."""
  f = flags.FLAGS
  found = {}
  if shape.nanogpt and not f.nanogpt_dir:
    print(f'{name}: nanoGPT skipped (no --nanogpt_dir)')
  elif shape.nanogpt:
    for compiled in (False, True) if f.nanogpt_compile else (False,):
      implementation = f'nanoGPT ({"torch.compile" if compiled else "eager"})'
      found[implementation] = lambda c=compiled: nanogpt_peer(
          f.nanogpt_dir, shape.nanogpt, c, f.steps, f.warmup_steps)
  if name == 'encdec':
    found['HF MarianMTModel'] = lambda: in_fresh_process(marian_peer, f.steps, f.warmup_steps)
    if f.flax_wmt_dir:
      found['flax examples/wmt'] = lambda: in_fresh_process(
          flax_wmt_peer, f.flax_wmt_dir, f.steps, f.warmup_steps)
    else:
      print(f'{name}: flax examples/wmt skipped (no --flax_wmt_dir)')
  if name == 'bert':
    found['HF BertForMaskedLM'] = lambda: in_fresh_process(bert_peer, f.steps, f.warmup_steps)
  return found


def measure_shape(name: str, shape: Shape) -> tuple[list[dict], dict]:
  """(rows of this project in float32 and bfloat16 and of each peer in float32, with ratios;
  the matmul peaks measured by the float32 run)."""
  f = flags.FLAGS
  common_fields = dict(shape=name, statistic='mean', steps=f.steps, warmup_steps=f.warmup_steps)
  rows = []
  for dtype in ('float32', 'bfloat16'):
    result = project_run(shape, dtype, f.steps, f.warmup_steps, f.data_dir)
    rows.append(dict(common_fields, implementation=PROJECT, dtype=dtype, **result))
    print(f'{name}: {PROJECT} {dtype} {result["step_ms"]} ms/step', flush=True)
  for implementation, run in peers(name, shape).items():
    result = run()
    result.update(step_ms=round(result['step_ms'], 2),
                  tokens_per_s=round(result['tokens_per_step'] / result['step_ms'] * 1000, 1))
    rows.append(dict(common_fields, implementation=implementation, dtype='float32', **result))
    print(f'{name}: {implementation} float32 {result["step_ms"]} ms/step', flush=True)
  fastest_peer = min((r['step_ms'] for r in rows if r['implementation'] != PROJECT), default=None)
  for row in rows:
    row['ratio'] = None if fastest_peer is None else round(fastest_peer / row['step_ms'], 3)
  return rows, rows[0]['peak_gflops']


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  unknown = set(f.shapes) - set(SHAPES)
  if unknown or f.steps < 1 or f.warmup_steps < 0:
    raise app.UsageError(f'--shapes from {", ".join(SHAPES)} (unknown: {sorted(unknown)}); '
                         '--steps >= 1, --warmup_steps >= 0.')
  rows, peaks = [], {}
  for name in f.shapes:
    shape_rows, peaks[name] = measure_shape(name, SHAPES[name])
    rows += shape_rows

  print(f'\nms/step: mean of {f.steps} timed steps after {f.warmup_steps} warm-up steps; ratio: '
        "the fastest peer's float32 ms/step / this row's.\n")
  print('| shape | implementation | dtype | ms/step | tokens/s | MFU | ratio |')
  print('|---|---|---|---:|---:|---:|---:|')
  for r in rows:
    ratio = '' if r['ratio'] is None else f'{r["ratio"]:.2f}'
    mfu = f'{r["mfu"]:.1%}' if 'mfu' in r else '—'  # this project's, against its dtype's peak
    print(f'| {r["shape"]} | {r["implementation"]} | {r["dtype"]} | {r["step_ms"]:.2f} | '
          f'{r["tokens_per_s"]:,.0f} | {mfu} | {ratio} |')
  print('\nMatmul peaks measured by this project\'s float32 run (GFLOP/s):\n')
  print('| shape | float32 | bfloat16 |')
  print('|---|---:|---:|')
  for name, peak in peaks.items():
    print(f'| {name} | {peak["float32"]} | {peak["bfloat16"]} |')
  print()
  for r in rows:
    print(json.dumps(r))


if __name__ == '__main__':
  app.run(main)
