"""Evaluation of a model's parameters: validation loss/perplexity/accuracy, BLEU, samples.

Used inside the training loop (periodic validation) and by `--mode=eval` (a split -> JSON).
`ctx` is a context.ModelContext (config, tokenizer, mesh, model), or the train.Experiment that
extends it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from transformer import data, decode, distributed, metrics, objectives, sharding, variants


def eval_step(params, batch: dict, memory: dict, *, model, config) -> tuple[dict, dict]:
  """Token sums of loss, NLL and accuracy on one batch (padding rows have weight 0), and the
  Transformer-XL memory after it (config.memory_length; {} without one)."""
  if config.memory_length:
    logits, memory = objectives.forward_with_memory(model, params, memory, batch)
  else:
    logits = objectives.forward(model, params, batch, deterministic=True)
  return objectives.loss_and_metrics(logits, batch, config.label_smoothing)[1], memory


def jit_eval_step(model, config, mesh, params_shardings):
  """eval_step compiled for params laid out as params_shardings and batches (and a memory's rows)
  split over the mesh."""
  step = functools.partial(eval_step, model=model, config=config)
  rows = sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(params_shardings, rows, rows), out_shardings=(None, rows))


def loss_metrics(ctx, eval_fn, params, batches) -> dict:
  """Token-weighted loss, NLL, perplexity and accuracy over `batches`; with a Transformer-XL
  memory, each batch's rows continue the last batch's (data.make_eval_batches)."""
  sums, memory = None, {}
  for batch in batches:
    batch = sharding.global_batch(batch, ctx.mesh)
    if sums is None and ctx.config.memory_length:
      memory = jax.jit(functools.partial(objectives.initial_memory, ctx.model),
                       out_shardings=sharding.batch_sharding(ctx.mesh))(batch)
    distributed.wait_before_launch(sums)
    out, memory = eval_fn(params, batch, memory)
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  return objectives.summarize(jax.device_get(sums))


def encode_sources(tokenizer, sources: list[str], max_len: int) -> tuple[np.ndarray, int]:
  """Source ids [N, max_len] (0-padded) and how many sources were truncated to fit."""
  ids = np.zeros((len(sources), max_len), np.int32)
  truncated = 0
  for i, text in enumerate(sources):
    tokens = tokenizer.encode(text)
    truncated += len(tokens) > max_len
    tokens = tokens[:max_len]
    ids[i, :len(tokens)] = tokens
  return ids, truncated


SOURCE_BUCKET = 16  # translate_texts pads sources to a multiple of this: few shapes to compile
# On the CPU backend, beam search runs faster in small batches: each step's cache reordering,
# softmax and top-k grow with the rows, and a batch waits for its longest sentence (measured in
# docs/results.md, Decoding). Accelerators want the opposite: their decode batch stays the
# config's.
CPU_DECODE_ROWS_PER_DEVICE = 16


def decode_batch_size(config, mesh) -> int:
  """Sentences per batch that translate_texts decodes: config.decode_batch_size if set, else
  eval_batch_size, capped at CPU_DECODE_ROWS_PER_DEVICE per data-parallel device on the CPU."""
  if config.decode_batch_size is not None:
    return config.decode_batch_size
  if jax.default_backend() != 'cpu':
    return config.eval_batch_size
  return min(config.eval_batch_size,
             CPU_DECODE_ROWS_PER_DEVICE * sharding.data_parallel_size(mesh.shape))


def translate_texts(ctx, params, sources: list[str], *, beam_size: int,
                    length_penalty: float | None = None) -> list[str]:
  """Detokenized translations of `sources`, in their order (length_penalty None: the config's).

  Decoded longest first in batches of decode_batch_size() split over the mesh's data-parallel
  devices: sentences of one batch are then of similar length, so that beam search's early stop
  rarely waits for one long sentence. A batch's sources are padded to a multiple of
  SOURCE_BUCKET tokens (a handful of shapes, each compiled once), and its outputs end after
  translate_max_ratio times that many tokens (or config.decode_max_len): each decoding step
  attends over the whole cache, so a cache sized to the sentences is a faster step.
  """
  config, tokenizer = ctx.config, ctx.tokenizer
  if length_penalty is None:
    length_penalty = config.length_penalty
  ids, truncated = encode_sources(tokenizer, sources, config.max_source_len)
  if truncated:
    logging.warning('%d of %d source sentences were longer than max_source_len=%d tokens and '
                    'were truncated.', truncated, len(sources), config.max_source_len)
  batch = decode_batch_size(config, ctx.mesh)
  lengths = (ids != 0).sum(axis=1)
  order = np.argsort(-lengths, kind='stable')
  outputs = [''] * len(sources)
  for start in range(0, len(ids), batch):
    rows = order[start:start + batch]
    width = min(ids.shape[1], -(-max(lengths[rows[0]], 1) // SOURCE_BUCKET) * SOURCE_BUCKET)
    padded = np.zeros((batch, width), np.int32)
    padded[:len(rows)] = ids[rows, :width]
    max_len = min(config.decode_max_len, int(config.translate_max_ratio * width))
    tokens = decode.translate(ctx.model, params,
                              jax.device_put(padded, sharding.batch_sharding(ctx.mesh)),
                              max_len=max_len, beam_size=beam_size,
                              length_penalty=length_penalty)
    for row, output in zip(rows, np.asarray(tokens)):
      outputs[row] = tokenizer.decode(output)
  return outputs


def translation_scores(ctx, params, split: str, *, beam_size: int,
                       length_penalty: float | None = None,
                       max_sentences: int | None = None) -> tuple[dict, list[str]]:
  """sacreBLEU (cased, lowercased) and chrF of `split` translations, and the hypotheses."""
  pairs = data.load_text_pairs(ctx.config, split)[:max_sentences or None]
  hypotheses = translate_texts(ctx, params, [src for src, _ in pairs], beam_size=beam_size,
                               length_penalty=length_penalty)
  return metrics.corpus_scores(hypotheses, [ref for _, ref in pairs]), hypotheses


def lm_samples(ctx, params, prompt: str, num_samples: int) -> list[str]:
  """Continuations of `prompt` by a causal LM, sampled with the config's decoding settings."""
  config, tokenizer = ctx.config, ctx.tokenizer
  prompt_ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
  room = config.max_len - config.decode_max_len  # the model sees at most max_len positions
  if room < 1:
    raise ValueError(f'decode_max_len={config.decode_max_len} leaves no room for a prompt in '
                     f'max_len={config.max_len}; lower --config.decode_max_len.')
  if len(prompt_ids) > room:
    logging.warning('The prompt has %d tokens; only its last %d are used.', len(prompt_ids), room)
    prompt_ids = prompt_ids[-room:]
  prompts = jnp.asarray(np.tile(np.asarray(prompt_ids, np.int32), (num_samples, 1)))
  tokens = decode.generate(ctx.model, params, prompts, max_len=config.decode_max_len,
                           temperature=config.temperature, top_k=config.top_k,
                           top_p=config.top_p, rng=jax.random.key(config.seed))
  return [prompt + tokenizer.decode(row) for row in np.asarray(tokens)]


def validation_metrics(exp, eval_fn, params) -> dict:
  """The periodic validation of the training loop, as flat 'eval_*' metrics."""
  config = exp.config
  batches = exp.eval_batches[:config.max_eval_batches or None]
  out = {f'eval_{k}': v for k, v in loss_metrics(exp, eval_fn, params, batches).items()}
  variant = variants.get(config.variant)
  if variant.translates and config.bleu_max_sentences:
    scores, hypotheses = translation_scores(exp, params, 'validation', beam_size=1,
                                            max_sentences=config.bleu_max_sentences)
    out.update({f'eval_{k}': v for k, v in scores.items()})
    out['eval_sample'] = hypotheses[0]
  if variant.generates:
    out['eval_sample'] = lm_samples(exp, params, '\n', 1)[0]
  return out
