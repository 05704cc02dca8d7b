"""Using a trained model from its workdir: the eval, translate, generate and fill_mask modes.

Each mode restores the latest (or best, or a given step's, or the averaged) checkpoint of a
workdir into the config's mesh.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from transformer import (checkpoint, config_checks, context, data, decode, errors, evaluate, optim,
                         variants, visualize)


def restore(config, workdir: str, which: str = 'latest'):
  """(model context, params, steps) of workdir's `which` checkpoint: its parameters alone, without
  the optimizer state, into a context that builds no optimizer and loads no data.

  `which` is 'latest', 'best', a step, or comma-separated steps whose parameters are averaged
  (the paper evaluates the average of its last checkpoints), or 'averaged': the average that
  training saved (config.average_last_checkpoints); `steps` lists the steps averaged or loaded.
  """
  ctx = context.ModelContext(config)
  abstract, _ = ctx.abstract_params()
  folder = checkpoint.AVERAGED if which == 'averaged' else checkpoint.CHECKPOINTS
  # Read-only: a training run may be writing to this workdir.
  with checkpoint.Checkpointer(workdir, config, ctx.tokenizer.vocab_size, read_only=True,
                               folder=folder) as ckpt:
    params, steps = checkpoint.average_params(ckpt, abstract, _steps(ckpt, which, config))
    if which == 'averaged':
      steps = ckpt.check_compatible(steps[0])['averaged_steps']
  logging.info('Restored the parameters of step %s from %s%s.', ', '.join(map(str, steps)),
               ckpt.directory, ' (averaged)' if len(steps) > 1 else '')
  return ctx, params, steps


def _steps(ckpt: checkpoint.Checkpointer, which: str, config) -> list[int | None]:
  """The steps that `which` names (None: the latest that restores)."""
  kept = ckpt.all_steps()
  if not kept and which == 'averaged':
    raise errors.MissingError(f'No averaged checkpoint in {ckpt.directory}: train with '
                              '--config.average_last_checkpoints=N (N >= 2), or average steps '
                              'with --checkpoint=STEP,STEP,...')
  if not kept:
    raise errors.MissingError(f'No checkpoint in {ckpt.directory}: train first with --mode=train '
                              f'--workdir={os.path.dirname(ckpt.directory)}')
  if which in ('latest', 'averaged'):
    return [None]
  if which == 'best':
    best = ckpt.best_step()
    if best is None:
      raise errors.ConfigError(f'No checkpoint in {ckpt.directory} has {config.best_metric!r}; '
                               'use --checkpoint=latest.')
    return [best]
  steps = [int(s) for s in which.split(',')]
  missing = [s for s in steps if s not in kept]
  if missing:
    raise errors.ConfigError(f'No checkpoint of step {", ".join(map(str, missing))} in '
                             f'{ckpt.directory}; it holds steps {", ".join(map(str, kept))}.')
  return steps


def split_losses(ctx, params, split: str) -> dict:
  """Loss, NLL, perplexity and accuracy of params on a whole split."""
  batches = data.make_eval_batches(ctx.config, ctx.tokenizer, split,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count())
  eval_fn = evaluate.jit_eval_step(ctx.model, ctx.config, ctx.mesh, None)
  return evaluate.loss_metrics(ctx, eval_fn, params, batches)


def run_eval(config, workdir: str, split: str, which: str = 'latest', *,
             restored=None, losses: dict | None = None) -> dict:
  """Loss/perplexity/accuracy of a whole split, plus BLEU and chrF for translation variants
  (decoded with config's beam_size and length_penalty).

  Writes WORKDIR/eval_<split>_step<N>.json (averaged checkpoints: eval_<split>_avg<N1>-<N2>.json;
  translation: ..._greedy.json or ..._beam<k>_lp<alpha>.json, so that checkpoints and decoding
  settings compared on validation keep their own files) and returns its content.
  restored: what restore(config, workdir, which) returned, to evaluate one checkpoint under
  several decoding settings without reading it again; losses: what split_losses measured for it
  (they do not depend on decoding), so as not to measure them again.
  """
  ctx, params, steps = restored or restore(config, workdir, which)
  result = dict(split=split, step=steps[-1], checkpoint=which, averaged_steps=steps,
                **(split_losses(ctx, params, split) if losses is None else losses))
  if variants.get(config.variant).translates:
    scores, hypotheses = evaluate.translation_scores(ctx, params, split,
                                                     beam_size=config.beam_size,
                                                     length_penalty=config.length_penalty)
    result.update(scores, beam_size=config.beam_size, length_penalty=config.length_penalty,
                  sample=hypotheses[:3])
    print(f'BLEU {scores["bleu"]:.2f} ({scores["bleu_signature"]})')
    print(f'BLEU {scores["bleu_lc"]:.2f} ({scores["bleu_lc_signature"]})')
    print(f'chrF {scores["chrf"]:.2f} ({scores["chrf_signature"]})')
  if jax.process_index() == 0:
    name = f'step{steps[0]}' if len(steps) == 1 else 'avg' + '-'.join(map(str, steps))
    path = epath.Path(os.fspath(workdir)) / f'eval_{split}_{name}{_decode_suffix(config)}.json'
    path.write_text(json.dumps(result, indent=2))
    logging.info('Wrote %s', path)
  return result


def _decode_suffix(config) -> str:
  if not variants.get(config.variant).translates:
    return ''
  if config.beam_size == 1:
    return '_greedy'
  return f'_beam{config.beam_size}_lp{config.length_penalty:g}'


def _read_lines(path: str | None) -> list[str]:
  if path:
    return epath.Path(path).read_text(encoding='utf-8').splitlines()
  return sys.stdin.read().splitlines()


def _write_lines(lines: list[str], path: str | None):
  text = ''.join(line + '\n' for line in lines)
  if path:
    epath.Path(path).write_text(text, encoding='utf-8')
  else:
    sys.stdout.write(text)
    sys.stdout.flush()


def run_translate(config, workdir: str, input_path: str | None, output_path: str | None,
                  which: str = 'latest'):
  """One output line per input line, in order; empty lines stay empty; long ones are truncated."""
  config_checks.check_mode(config, 'translate')
  ctx, params, _ = restore(config, workdir, which)
  lines = _read_lines(input_path)
  sources = [line.strip() for line in lines]
  nonempty = [i for i, line in enumerate(sources) if line]
  translations = evaluate.translate_texts(ctx, params, [sources[i] for i in nonempty],
                                          beam_size=config.beam_size) if nonempty else []
  outputs = [''] * len(lines)
  for i, text in zip(nonempty, translations):
    outputs[i] = text
  _write_lines(outputs, output_path)


def run_generate(config, workdir: str, prompt: str, num_samples: int, which: str = 'latest'):
  """Prints num_samples continuations of `prompt` (sampled with the config's settings)."""
  config_checks.check_mode(config, 'generate')
  ctx, params, _ = restore(config, workdir, which)
  samples = evaluate.lm_samples(ctx, params, prompt, num_samples)
  _write_lines([f'--- sample {i} ---\n{s}' for i, s in enumerate(samples)], None)
  return samples


def run_fill_mask(config, workdir: str, text: str, top_k: int = 5, which: str = 'latest'):
  """The top_k predictions for each <mask> in `text`, one line per mask."""
  config_checks.check_mode(config, 'fill_mask')
  ids = _fill_mask_ids(config, data.get_tokenizer(config), text)  # before the slower restore
  ctx, params, _ = restore(config, workdir, which)
  tok = ctx.tokenizer
  ids_BxL = jnp.asarray([ids], jnp.int32)
  top_ids, top_probs = decode.fill_mask(ctx.model, params, ids_BxL, top_k=top_k)
  lines = []
  for position in np.flatnonzero(np.asarray(ids) == tok.mask_id):
    guesses = ', '.join(f'{tok.decode([int(i)])!r} {float(p):.3f}'
                        for i, p in zip(top_ids[0, position], top_probs[0, position]))
    lines.append(f'position {position}: {guesses}')
  _write_lines(lines, None)
  return lines


def _fill_mask_ids(config, tok, text: str) -> list[int]:
  """cls + text + sep, as the masked LM read in training; ConfigError if that does not fit
  max_len or holds no <mask> (cutting the text would drop masks without a word)."""
  ids = [tok.cls_id] + tok.encode(text) + [tok.sep_id]
  if len(ids) > config.max_len:
    raise errors.ConfigError(f'--text is {len(ids) - 2} tokens long; the model reads at most '
                             f'max_len - 2 = {config.max_len - 2} (cls and sep take two): '
                             'shorten it.')
  if tok.mask_id not in ids:
    raise errors.ConfigError(f'--text has no <mask> token: {text!r}')
  return ids


def run_visualize(config, workdir: str, text: str | None, which: str = 'latest') -> list[str]:
  """Teaching plots (positional encodings, masks, this config's schedule) into WORKDIR/plots, and
  per-layer, per-head attention heatmaps of `text` (default: the first validation source) when
  the workdir has a checkpoint."""
  out_dir = os.path.join(os.fspath(workdir), 'plots')
  paths = visualize.write_teaching_plots(out_dir, schedule=optim.make_schedule(config),
                                         num_steps=config.num_train_steps,
                                         d_model=config.d_model)
  try:
    ctx, params, _ = restore(config, workdir, which)
    paths += _attention_plots(ctx, params, text, out_dir)
  except FileNotFoundError as e:
    logging.info('%s Attention heatmaps need a trained model.', e)
  for path in paths:
    print(path)
  return paths


def _attention_plots(ctx, params, text: str | None, out_dir: str) -> list[str]:
  config, tok = ctx.config, ctx.tokenizer
  variant = variants.get(config.variant)
  if text is None:
    text = (data.load_text_pairs(config, 'validation')[0][0] if variant.translates
            else data.load_texts(config, 'validation')[0])
  pieces = lambda ids: [tok.decode([i]) or f'<{i}>' for i in ids]
  source = tok.encode(text)[:config.max_source_len]
  if variant.translates:
    output = np.asarray(decode.translate(ctx.model, params, jnp.asarray([source], jnp.int32),
                                         max_len=config.decode_max_len))[0]
    target = [tok.bos_id] + [int(i) for i in output if i not in (0, tok.eos_id)]
    if variant.encoder_decoder:
      return visualize.write_attention_plots(
          out_dir, ctx.model, params, jnp.asarray([source]), jnp.asarray([target]),
          source_labels=pieces(source), target_labels=pieces(target))
    sequence = source + target
    types = [0] * len(source) + [1] * len(target)
    return visualize.write_attention_plots(
        out_dir, ctx.model, params, jnp.asarray([sequence]), source_labels=pieces(sequence),
        prefix_len=jnp.asarray([len(source)]), token_types=jnp.asarray([types]))
  ids = tok.encode(text)[:config.max_len - 2]
  if variant.fills_masks:  # a masked LM reads cls + text + sep, as in training
    ids = [tok.cls_id] + ids + [tok.sep_id]
  return visualize.write_attention_plots(out_dir, ctx.model, params, jnp.asarray([ids]),
                                         source_labels=pieces(ids))
