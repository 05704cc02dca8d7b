"""grain input pipelines, one per objective, yielding numpy batches of fixed shapes.

Each objective (translation, causal_lm, masked_lm, prefix_lm) says how to turn a split into token-id
examples, an example into unpadded features, and how long each feature is padded; two shared
functions turn that into batches:
- make_train_iterator: infinite, reshuffled every epoch (seeded), this process's disjoint shard,
  checkpointable with get_state()/set_state().
- make_eval_batches: a whole split once, in order, nothing dropped (too long -> truncated, the
  last batch padded with weight-0 rows).
Ids are int32, weights float32. Each split is tokenized once into prepared token ids
(transformer/data/prepared.py) that every run and every process reads by index: a process reads only
its shard, and memory does not grow with the corpus.
"""

import dataclasses
import functools
import math
from typing import Callable, Sequence

import grain
import numpy as np

from transformer import errors, variants
from transformer.data import builders, prepared, subword_sampling
from transformer.data.tokenizer import (BOS_ID, CLS_ID, EOS_ID, MASK_ID, NUM_SPECIAL, SEP_ID,
                                        Tokenizer)

SPLITS_SEED_PURPOSE = 1  # _process_seed's purpose for subword splits (masking has none).
Example = tuple[np.ndarray, ...]  # Token ids of one example: (source, target), (tokens,), ...
Features = dict[str, np.ndarray]


# --- Text of a split -----------------------------------------------------------------------------

def _translation_fields(config) -> tuple[str, str]:
  """The (source, target) features of the prepared parallel dataset."""
  if config.dataset in builders.PARALLEL_LANGS:
    langs = builders.PARALLEL_LANGS[config.dataset]
    if config.source_lang not in langs or config.target_lang not in langs or (
        config.source_lang == config.target_lang):
      raise errors.ConfigError(f'{config.dataset} translates between {" and ".join(langs)}; got '
                               f'source_lang={config.source_lang!r}, '
                               f'target_lang={config.target_lang!r}.')
    return config.source_lang, config.target_lang
  if config.dataset == 'text' and builders.get_builder(config).builder_config.parallel:
    return 'source', 'target'
  raise errors.ConfigError(f'{config.variant} needs parallel data '
                           f'({", ".join(builders.PARALLEL_LANGS)}, or dataset=text with '
                           f'source:target file pairs); {config.dataset} is monolingual.')


def load_text_pairs(config, split: str) -> list[tuple[str, str]]:
  """Stripped raw (source, target) strings of a translation split, in file order."""
  source, target = _translation_fields(config)
  return [(e[source], e[target]) for e in builders.load_split(config, split)]


def _lm_sides(config) -> list[str]:
  """The text fields a language model reads: every side (or config.lm_sides) of the corpus."""
  sides = sorted(builders.get_builder(config).info.features)
  if config.lm_sides:
    requested = [s.strip() for s in config.lm_sides.split(',')]
    if not set(requested) <= set(sides):
      raise errors.ConfigError(f'lm_sides={config.lm_sides!r}: {config.dataset} has sides {sides}.')
    sides = requested
  return sides


def load_texts(config, split: str) -> list[str]:
  """Monolingual texts of a split: each side (or config.lm_sides) of parallel data, one by one."""
  examples = builders.load_split(config, split)
  return [e[side] for side in _lm_sides(config) for e in examples]


# --- Objectives ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Objective:
  """How one training objective makes batches."""
  recipe: Callable[[bool], prepared.Recipe]  # train -> how a split's records become examples.
  features: Callable[..., Features]  # (example, rng) -> unpadded features (rng: masking only).
  lengths: dict[str, int]  # Padded length of each sequence feature; others are scalars.
  window: int = 0  # > 0: the examples are windows of window+1 ids of the split's token stream.
  packed: dict[str, str] = dataclasses.field(default_factory=dict)  # Packing: feature whose
  # segments are numbered -> prefix of its '_segment_ids' / '_positions' outputs.
  random: bool = False  # features() draws from rng (fresh every epoch).


def _pair_recipe(config, train: bool) -> prepared.Recipe:
  """(source, target) ids; too long: dropped (train) or truncated (eval)."""
  return prepared.Recipe(passes=(_translation_fields(config),),
                         max_lens=(config.max_source_len, config.max_target_len), train=train)


def translation(config, tokenizer: Tokenizer) -> Objective:
  """Enc-dec: inputs [S] = source; decoder_inputs [T+1] = bos+target, targets = target+eos."""

  def features(example, rng=None):
    del rng
    source, target = example
    return {'inputs': source, 'decoder_inputs': np.concatenate([[BOS_ID], target]),
            'targets': np.concatenate([target, [EOS_ID]]),
            'weights': np.ones(len(target) + 1, np.float32)}

  decoder_len = config.max_target_len + 1
  return Objective(
      recipe=functools.partial(_pair_recipe, config), features=features,
      lengths=dict(inputs=config.max_source_len, decoder_inputs=decoder_len, targets=decoder_len,
                   weights=decoder_len),
      packed={'inputs': 'inputs', 'decoder_inputs': 'decoder'})


def prefix_lm(config, tokenizer: Tokenizer) -> Objective:
  """One stack on seq = source + bos + target + eos: inputs = seq[:-1], targets = seq[1:] [S+T+1].

  prefix_len = len(source): the bidirectional part; loss (weights) and token_types 1 from there on.
  Packed rows drop prefix_len: the model finds each example's source by its token type 0.
  """

  def features(example, rng=None):
    del rng
    source, target = example
    seq = np.concatenate([source, [BOS_ID], target, [EOS_ID]])
    in_target = np.arange(len(seq) - 1) >= len(source)
    out = {'inputs': seq[:-1], 'targets': seq[1:], 'weights': in_target.astype(np.float32),
           'token_types': in_target.astype(np.int32)}
    if not config.packing:
      out['prefix_len'] = np.int32(len(source))
    return out

  length = config.max_source_len + config.max_target_len + 1
  return Objective(recipe=functools.partial(_pair_recipe, config), features=features,
                   lengths=dict(inputs=length, targets=length, weights=length, token_types=length),
                   packed={'inputs': ''})


def causal_lm(config, tokenizer: Tokenizer) -> Objective:
  """Windows of block_size+1 contiguous tokens of the split's text: inputs/targets [block_size].

  The text is all examples in order: running text as is, sentences each followed by eos. Windows
  start every block_size tokens; train keeps full windows, eval pads the last one (weights 0).
  """

  def recipe(train):
    del train  # Nothing is dropped: the stream is every text in order.
    suffix = () if config.dataset in builders.RUNNING_TEXT_DATASETS else (EOS_ID,)
    return prepared.Recipe(passes=tuple((side,) for side in _lm_sides(config)), suffix=suffix)

  def features(window, rng=None):
    del rng
    return {'inputs': window[:-1], 'targets': window[1:],
            'weights': np.ones(len(window) - 1, np.float32)}

  size = config.block_size
  return Objective(recipe=recipe, features=features,
                   lengths=dict(inputs=size, targets=size, weights=size), window=size)


def mask_tokens(tokens: np.ndarray, rng: np.random.Generator, *, vocab_size: int,
                probability: float, max_predictions: int) -> tuple[np.ndarray, np.ndarray]:
  """BERT masking of tokens [L] -> (inputs [L], weights [L] = 1.0 at the selected positions).

  Selects `probability` of the non-special tokens (stochastic rounding keeps the rate exact even for
  short sequences), at most max_predictions; of those 80% -> mask, 10% -> a random non-special
  token, 10% unchanged.
  """
  candidates = np.flatnonzero(tokens >= NUM_SPECIAL)
  count = min(max_predictions, int(probability * len(candidates) + rng.random()))
  selected = rng.choice(candidates, count, replace=False)
  action = rng.random(count)
  inputs = tokens.copy()
  inputs[selected[action < 0.8]] = MASK_ID
  randomized = selected[(action >= 0.8) & (action < 0.9)]
  inputs[randomized] = rng.integers(NUM_SPECIAL, vocab_size, len(randomized))
  weights = np.zeros(len(tokens), np.float32)
  weights[selected] = 1.0
  return inputs, weights


def masked_lm(config, tokenizer: Tokenizer) -> Objective:
  """inputs [block_size] = cls + tokens + sep, masked; targets = the original ids; token_types 0."""

  def recipe(train):  # Running text: one example per non-empty line.
    return prepared.Recipe(passes=tuple((side,) for side in _lm_sides(config)),
                           max_lens=(config.block_size - 2,), train=train, strip_empty=True)

  def features(example, rng):
    tokens = np.concatenate([[CLS_ID], example[0], [SEP_ID]]).astype(np.int32)
    inputs, weights = mask_tokens(tokens, rng, vocab_size=tokenizer.vocab_size,
                                  probability=config.mlm_probability,
                                  max_predictions=config.mlm_max_predictions)
    return {'inputs': inputs, 'targets': tokens, 'weights': weights,
            'token_types': np.zeros(len(tokens), np.int32)}

  size = config.block_size
  return Objective(recipe=recipe, features=features,
                   lengths=dict(inputs=size, targets=size, weights=size, token_types=size),
                   packed={'inputs': ''}, random=True)


# variants.Variant.data -> the objective that makes its batches.
OBJECTIVES = {'translation': translation, 'prefix_lm': prefix_lm, 'causal_lm': causal_lm,
              'masked_lm': masked_lm}


def get_objective(config, tokenizer: Tokenizer) -> Objective:
  """The objective that turns config's examples into its variant's batches (variants.Variant.data).

  Raises errors.ConfigError when config.packing is asked of an objective that cannot pack.
  """
  objective = OBJECTIVES[variants.get(config.variant).data](config, tokenizer)
  if config.packing and not objective.packed:
    packable = ', '.join(name for name, v in variants.VARIANTS.items()
                         if OBJECTIVES[v.data](config, tokenizer).packed)
    raise errors.ConfigError(f'config.packing applies to {packable}, not {config.variant}.')
  return objective


def sequence_lengths(config) -> dict[str, int]:
  """The padded length of each sequence feature of config's batches, from the config alone (an
  objective reads its tokenizer only once it makes examples)."""
  return dict(OBJECTIVES[variants.get(config.variant).data](config, None).lengths)


def split_examples(config, tokenizer: Tokenizer, objective: Objective, split: str, train: bool
                   ) -> Sequence[Example]:
  """The split's token-id examples, prepared on first use; refuses a split left empty."""
  examples = prepared.load(config, tokenizer, split, objective.recipe(train))
  counts = examples.metadata['counts']
  if objective.window:
    examples = prepared.Windows(examples, objective.window, train)
  if not len(examples):  # pylint: disable=g-explicit-length-test
    raise errors.ConfigError(
        f'{config.dataset} {split}: no examples left: of {counts["records"]} texts, '
        f'{counts["empty"]} empty, {counts["too_long"]} too long '
        f'({config.variant} limits: {objective.lengths}); {sum(counts["tokens"])} tokens.')
  return examples


# --- Shared batching -----------------------------------------------------------------------------

def _collate(rows: list[Features], lengths: dict[str, int], num_rows: int | None = None,
             keys=None) -> Features:
  """Stacks rows into a batch, padding sequences with 0 to lengths[key] and missing rows with 0.

  Ids become int32, weights float32; features not in lengths are scalars -> shape [num_rows].
  """
  num_rows = len(rows) if num_rows is None else num_rows
  batch = {}
  for key in (rows[0] if keys is None else keys):
    dtype = np.float32 if key == 'weights' else np.int32
    if key in lengths:
      batch[key] = np.zeros((num_rows, lengths[key]), dtype)
      for i, row in enumerate(rows):
        batch[key][i, :len(row[key])] = row[key]
    else:
      batch[key] = np.zeros(num_rows, dtype)
      batch[key][:len(rows)] = [row[key] for row in rows]
  return batch


def _rename_packed(batch: Features, packed: dict[str, str]) -> Features:
  """grain's '<feature>_segment_ids' / '_positions' -> this project's names."""
  for feature, prefix in packed.items():
    for suffix in ('segment_ids', 'positions'):
      batch[f'{prefix}_{suffix}' if prefix else suffix] = batch.pop(f'{feature}_{suffix}')
  return batch


def _per_process(global_size: int, process_count: int, name: str) -> int:
  if global_size % process_count:
    raise errors.ConfigError(f'{name}={global_size} is not divisible by '
                             f'process_count={process_count}.')
  return global_size // process_count


def make_train_iterator(config, tokenizer: Tokenizer, *, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """Infinite iterator of this process's batches (config.batch_size // process_count rows).

  Each process reads a disjoint shard of the train split; the order depends only on
  config.shuffle_buffer_seed (reshuffled every epoch); get_state()/set_state() resume exactly.
  With a Transformer-XL memory (config.memory_length) nothing is shuffled: the rows of the
  global batch are config.batch_size continuous streams through the text (prepared.Streams).
  """
  objective = get_objective(config, tokenizer)
  batch_size = _per_process(config.batch_size, process_count, 'batch_size')
  examples = split_examples(config, tokenizer, objective, 'train', True)
  if config.memory_length:
    streams = prepared.Streams(examples, config.batch_size, process_index * batch_size,
                               batch_size)
    if not len(streams):  # pylint: disable=g-explicit-length-test
      raise errors.ConfigError(
          f'{config.dataset} train: {len(examples)} windows of block_size={config.block_size} '
          f'tokens cannot make batch_size={config.batch_size} streams (memory_length); lower '
          'either.')
    ds = grain.MapDataset.source(streams).repeat()
  else:
    usable = len(examples) - len(examples) % process_count  # Equal shards: lockstep epochs.
    ds = grain.MapDataset.source(examples)[process_index:usable:process_count]
    ds = ds.shuffle(seed=config.shuffle_buffer_seed).repeat()  # The shuffle reseeds each epoch.
  # Each random_map's rng depends on the position in the stream: fresh draws every epoch.
  if config.subword_split_rate:
    pieces, scores = tokenizer.pieces_and_scores()
    split = functools.partial(subword_sampling.split_example, rate=config.subword_split_rate,
                              table_Vx2=subword_sampling.merge_table(pieces, scores),
                              max_lens=objective.recipe(True).max_lens)
    ds = ds.random_map(split, seed=_process_seed(config, process_index, SPLITS_SEED_PURPOSE))
  if objective.random:
    ds = ds.random_map(objective.features, seed=_process_seed(config, process_index))
  else:
    ds = ds.map(objective.features)
  lengths = dict(objective.lengths)
  if not config.packing:  # Batches by index: worker processes each make whole batches, in order.
    ds = ds.batch(batch_size, batch_fn=functools.partial(_collate, lengths=lengths))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0))  # Threads only add contention here.
  if config.packing:  # batch_size bins are filled first-fit, then emitted together as one batch.
    ds = grain.experimental.FirstFitPackIterDataset(
        ds, length_struct=objective.lengths, num_packing_bins=batch_size, shuffle_bins=False,
        meta_features=[k for k in objective.lengths if k not in objective.packed])
    lengths.update({f'{k}_{s}': lengths[k] for k in objective.packed
                    for s in ('segment_ids', 'positions')})
    ds = ds.batch(batch_size, drop_remainder=True,
                  batch_fn=functools.partial(_collate, lengths=lengths))
    ds = ds.map(functools.partial(_rename_packed, packed=objective.packed))
  if config.worker_count > 0:  # Each worker makes whole batches of its slice of the indices,
    # taken in turn: unpacked batches are the same for any worker count, packed rows are filled
    # from each worker's slice (the packing, the slowest part, runs in parallel).
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count))
  return iter(ds)


def _process_seed(config, process_index: int, *purpose: int) -> int:
  """Seed of a random draw: from the data seed, distinct per process (different data, different
  draws) and per purpose (masking: none; subword splits: SPLITS_SEED_PURPOSE)."""
  sequence = np.random.SeedSequence([config.shuffle_buffer_seed, process_index, *purpose])
  return int(sequence.generate_state(1)[0])


def make_eval_batches(config, tokenizer: Tokenizer, split: str = 'validation', *,
                      process_index: int = 0, process_count: int = 1) -> list[Features]:
  """The whole split once, in order: this process's rows of each global batch.

  Global batch b holds examples [b*G, (b+1)*G) (G = config.eval_batch_size); process p gets rows
  [p*G/P, (p+1)*G/P) of it, so concatenating the processes' batches restores the order. Too-long
  examples are truncated; missing rows at the end are padding with weights 0.
  With a Transformer-XL memory (config.memory_length) the rows are instead G continuous streams
  of ceil(N / G) examples each: global batch t, row r holds example r * ceil(N / G) + t.
  """
  objective = get_objective(config, tokenizer)
  batch_size = _per_process(config.eval_batch_size, process_count, 'eval_batch_size')
  examples = split_examples(config, tokenizer, objective, split, False)

  def row(index: int) -> Features:
    # Masking (bert_mlm) is seeded by the example's index: the same masks at every evaluation.
    return objective.features(examples[index], np.random.default_rng([config.shuffle_buffer_seed,
                                                                       index]))

  keys = list(row(0))
  global_batch = batch_size * process_count
  count = len(examples)
  if config.memory_length:
    per_stream = math.ceil(count / global_batch)
    order = [range(t, per_stream * global_batch, per_stream) for t in range(per_stream)]
  else:
    order = [range(start, start + global_batch) for start in range(0, count, global_batch)]
  batches = []
  for indices in order:
    mine = indices[process_index * batch_size:(process_index + 1) * batch_size]
    # Examples past the end fall at the end of a batch (and of each process's rows).
    rows = [row(i) for i in mine if i < count]
    batches.append(_collate(rows, objective.lengths, batch_size, keys))
  return batches
