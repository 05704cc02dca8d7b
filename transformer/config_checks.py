"""Checks of a run's config that fail fast, before anything costly or lasting happens.

Without them a wrong value surfaces late and obscurely: a batch that does not split over the
devices fails inside XLA after the data is prepared and the workdir created; a misspelled choice
fails when the model is first built. Each check names the field and what would work.

launch/main.py runs `check` (the config alone) before JAX touches a device, and `check_mesh` (which
needs the device count) right after distributed.initialize, before the workdir is touched.
train.Experiment runs `check` too, for callers of the library.
"""

import math

import jax

from transformer import (attention, attention_kinds, errors, norms, optim, positions, precision,
                         sharding, variants)
from transformer.data import pipelines, tokenizer
from transformer.layers import ACTIVATIONS, FFN_KINDS, REMAT_POLICIES

ON_NONFINITE = ('stop', 'skip')  # what train._check_finite does with a non-finite step
# Modes that only some variants can do: the Variant attribute that says so.
MODE_ABILITY = {'translate': 'translates', 'generate': 'generates', 'fill_mask': 'fills_masks'}
# The batches each mode splits over the data-parallel devices.
SHARDED_BATCHES = {
    'train': ('batch_size', 'eval_batch_size', 'decode_batch_size'),
    'eval': ('eval_batch_size', 'decode_batch_size'),
    'translate': ('eval_batch_size', 'decode_batch_size'),
    'select': ('eval_batch_size', 'decode_batch_size')}


def _choices() -> dict[str, tuple[str, ...]]:
  """Config fields with a fixed set of values (variants at call time: extensions register more)."""
  return dict(variant=tuple(variants.VARIANTS), schedule=optim.SCHEDULES,
              optimizer=optim.OPTIMIZERS, on_nonfinite=ON_NONFINITE, positional=positions.KINDS,
              sinusoidal_layout=positions.SINUSOIDAL_LAYOUTS, activation=tuple(ACTIVATIONS),
              tokenizer=tokenizer.TOKENIZERS, norm=norms.KINDS, ffn=FFN_KINDS,
              attention_kind=attention_kinds.KINDS, attention_impl=attention.IMPLS,
              remat=tuple(REMAT_POLICIES), dtype=precision.DTYPES)


def _problems(config) -> list[str]:
  problems = [f'config.{field}={config[field]!r} is not one of {", ".join(choices)}.'
              for field, choices in _choices().items() if config[field] not in choices]
  if config.decode_batch_size is not None and config.decode_batch_size < 1:
    problems.append(f'config.decode_batch_size={config.decode_batch_size} must be positive, or '
                    'unset for the default.')
  if config.d_model % config.num_heads:
    problems.append(f'config.d_model={config.d_model} is not divisible by '
                    f'config.num_heads={config.num_heads}.')
  if config.num_kv_heads and config.num_heads % config.num_kv_heads:
    problems.append(f'config.num_heads={config.num_heads} is not divisible by '
                    f'config.num_kv_heads={config.num_kv_heads} (each key/value head serves a '
                    'group of query heads).')
  if config.attention_kind in ('local', 'strided', 'lsh') and config.attention_window < 1:
    problems.append(f'config.attention_window={config.attention_window} must be at least 1 '
                    f'(attention_kind={config.attention_kind}).')
  if config.num_global_tokens < 0:
    problems.append(f'config.num_global_tokens={config.num_global_tokens} must be 0 (none) or '
                    'positive.')
  elif config.num_global_tokens:
    if config.attention_kind != 'local':
      problems.append(f'config.num_global_tokens={config.num_global_tokens} (Longformer\'s '
                      'global tokens) needs config.attention_kind=local, not '
                      f'{config.attention_kind}.')
    if config.packing:
      problems.append(f'config.num_global_tokens={config.num_global_tokens} needs '
                      'config.packing=False: the global tokens are the first of each row, and a '
                      'packed example may start anywhere in it.')
  if config.attention_kind in ('strided', 'lsh') and config.attention_impl != 'xla':
    problems.append(f'config.attention_kind={config.attention_kind} joins several key sets in '
                    f'one softmax of its own: attention_impl={config.attention_impl} cannot '
                    'compute it; use xla.')
  if config.attention_kind == 'lsh':
    if config.lsh_buckets < 2 or config.lsh_buckets % 2:
      problems.append(f'config.lsh_buckets={config.lsh_buckets} must be even and at least 2: '
                      'h(x) = argmax([xR; -xR]) gives two buckets to each of the '
                      'lsh_buckets / 2 rotations.')
    if config.lsh_rounds < 1:
      problems.append(f'config.lsh_rounds={config.lsh_rounds} must be at least 1.')
    if config.positional in positions.LOGIT_BIASES:
      problems.append('config.attention_kind=lsh reads its keys in hash-bucket order, for which '
                      f'no logit bias is computed: positional={config.positional} cannot be '
                      'used with it (sinusoidal, learned or rotary can).')
    if config.qk_norm:
      problems.append('config.attention_kind=lsh has no keys of its own (each is its query, '
                      'unit-normalised): set qk_norm=False.')
  if config.attention_kind == 'low_rank':
    mask_kind = variants.get(config.variant).model_kwargs.get('mask_kind')
    if mask_kind != 'bidirectional' or config.packing or config.positional not in (
        'sinusoidal', 'learned'):
      problems.append(
          'config.attention_kind=low_rank mixes every position of a row into each projected '
          'key: it needs a bidirectional variant (bert_mlm), packing=False and absolute '
          f'positions (sinusoidal or learned), not variant={config.variant}, '
          f'packing={config.packing}, positional={config.positional}.')
  if config.attention_impl != 'xla' and config.attention_dropout_rate:
    problems.append(f'config.attention_impl={config.attention_impl} (jax.nn.dot_product_attention) '
                    'applies no attention dropout: set attention_dropout_rate=0 or '
                    'attention_impl=xla.')
  if config.memory_length:
    problems.extend(_memory_problems(config))
  if config.subword_split_rate:
    problems.extend(_subword_split_problems(config))
  if config.scan_layers and config.share_layers:
    problems.append('config.scan_layers stacks one set of parameters per layer; '
                    'config.share_layers has one for all: choose one.')
  average, keep = config.average_last_checkpoints, config.max_checkpoints_to_keep
  if average and not 2 <= average <= keep:
    problems.append(f'config.average_last_checkpoints={average} must be 0 (off) or from 2 to '
                    f'config.max_checkpoints_to_keep={keep}: the checkpoints it averages must '
                    'still be kept.')
  if config.batch_size % config.grad_accum_steps:
    problems.append(f'config.batch_size={config.batch_size} is not divisible by '
                    f'config.grad_accum_steps={config.grad_accum_steps}.')
  if config.positional == 'learned' and config.variant in variants.VARIANTS:
    too_long = {k: n for k, n in pipelines.sequence_lengths(config).items() if n > config.max_len}
    if too_long:
      problems.append(f'Sequences of {_lengths(too_long)} tokens exceed the learned positions '
                      f'of config.max_len={config.max_len}; raise max_len or shorten them.')
  return problems


def _memory_problems(config) -> list[str]:
  """What Transformer-XL's memory (config.memory_length) needs of the rest of the config."""
  field = f'config.memory_length={config.memory_length}'
  if config.memory_length < 0:
    return [f'{field} must be 0 (no memory) or positive.']
  needs = []
  if variants.get(config.variant).data != 'causal_lm':
    needs.append(f'a language model over running text (a variant whose data is causal_lm: '
                 f'{", ".join(n for n, v in variants.VARIANTS.items() if v.data == "causal_lm")}'
                 f'), not config.variant={config.variant}')
  if config.positional not in positions.RELATIVE:
    needs.append(f'relative positions (config.positional: {", ".join(positions.RELATIVE)}), '
                 f'not {config.positional}: absolute ones would restart at every segment')
  if config.attention_kind != 'full':
    needs.append(f'config.attention_kind=full, not {config.attention_kind}')
  if config.packing:
    needs.append('config.packing=False (each row is one continuous stream)')
  if config.scan_layers:
    needs.append('config.scan_layers=False (each layer reads a memory of its own)')
  return [f'{field} (Transformer-XL) needs {need}.' for need in needs]


def _subword_split_problems(config) -> list[str]:
  """What splitting tokens into BPE's merged halves (config.subword_split_rate) needs."""
  field = f'config.subword_split_rate={config.subword_split_rate}'
  if not 0 < config.subword_split_rate < 1:
    return [f'{field} must be 0 (off) or between 0 and 1.']
  needs = []
  if (config.tokenizer, config.spm_model_type) != ('sentencepiece', 'bpe'):
    needs.append('a BPE vocabulary (config.tokenizer=sentencepiece, config.spm_model_type=bpe), '
                 f'not tokenizer={config.tokenizer}, spm_model_type={config.spm_model_type}')
  if config.variant in variants.VARIANTS and variants.get(config.variant).data == 'causal_lm':
    needs.append('a variant whose examples are sentences, not the windows of block_size '
                 f'tokens that config.variant={config.variant} reads')
  return [f'{field} needs {need}.' for need in needs]


def _lengths(lengths: dict[str, int]) -> str:
  return ', '.join(f'{n} ({feature})' for feature, n in lengths.items())


def check(config, mode: str = 'train'):
  """ConfigError naming each field of config that cannot work, or a mode its variant lacks."""
  problems = _problems(config)
  if problems:
    raise errors.ConfigError(' '.join(problems))
  check_mode(config, mode)


def check_mode(config, mode: str):
  """ConfigError unless config.variant can do `mode` (translate, generate, fill_mask)."""
  ability = MODE_ABILITY.get(mode)
  if ability and not getattr(variants.get(config.variant), ability):
    raise errors.ConfigError(f'--mode={mode} needs a variant that {ability.replace("_", " ")} '
                             f'({", ".join(variants.able(ability))}), not {config.variant}.')


def check_mesh(config, mode: str = 'train'):
  """ConfigError if the mesh does not fit the devices, or a batch of `mode` does not split evenly
  over the data-parallel devices (mesh data x fsdp) and the processes. Needs the devices: call
  after distributed.initialize."""
  shape = sharding.mesh_shape(config, jax.device_count())
  parallel = sharding.data_parallel_size(shape)
  split = math.lcm(parallel, jax.process_count())
  uneven = [name for name in SHARDED_BATCHES.get(mode, ())
            if config[name] is not None and config[name] % split]
  if uneven:
    sizes = ' and '.join(f'config.{name}={config[name]}' for name in uneven)
    processes = f' and {jax.process_count()} processes' if jax.process_count() > 1 else ''
    raise errors.ConfigError(
        f'{sizes} must be a multiple of {split}: batches are split over {parallel} data-parallel '
        f'devices (mesh data={shape["data"]} x fsdp={shape["fsdp"]} of {jax.device_count()} '
        f'devices){processes}.')


def check_fields(config, names, flag: str):
  """ConfigError unless every name is a field of config (for flags that list fields: a misspelled
  one would silently match nothing)."""
  unknown = [name for name in names if name not in config]
  if unknown:
    raise errors.ConfigError(f'{flag}: {", ".join(unknown)} is not a config field.')
