"""Token ids of a split, prepared once and then read by index: corpora of any size, streamed.

Preparation reads the split's records (the array_record files of builders.py) in chunks of
CHUNK_RECORDS, tokenizes the chunks in parallel worker processes and saves each one as it finishes,
so that an interrupted preparation resumes where it stopped. The chunks are then merged into one
flat token array per part of an example (source and target, or one text) and the offsets where
each example starts; metadata.json, with the counts that the logs report, is written last, and the
folder is renamed into place: a folder under its final name is complete.

The folder's name is a hash of everything that changes the ids: the prepared corpus (its TFDS folder,
which for dataset=text is keyed by the files), the split, the tokenizer's fingerprint and the
Recipe. A changed setting prepares anew instead of reading stale ids.

Reading (Examples, Windows) memory-maps the arrays, opened lazily in each process (also in grain's
worker processes): a process holds only the pages it reads, so neither start-up time nor host memory
grows with the corpus.
"""

import dataclasses
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import shutil

from absl import logging
import ml_collections
import numpy as np

from transformer.data import builders, tokenizer as tokenizers

CHUNK_RECORDS = 20_000  # Records tokenized per job and saved per file (the unit of resuming).
PARALLEL_MIN_RECORDS = 200_000  # Smaller splits are tokenized in this process (no start-up cost).
# What each chunk counts (saved in metadata.json): records read, examples kept, examples longer than
# max_lens (dropped or truncated), empty texts skipped, UTF-8 bytes of text read.
COUNTS = ('records', 'examples', 'too_long', 'empty', 'text_bytes')
FORMAT_VERSION = 1  # Bump when the files' layout changes: old folders are then prepared anew.


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How one split's records become token-id examples (an example is one or two parts)."""
  passes: tuple[tuple[str, ...], ...]  # Each pass reads every record and makes one example of
  # these fields per record: (('de', 'en'),) for translation, (('de',), ('en',)) for a language
  # model over both sides (all of one side, then the other).
  max_lens: tuple[int, ...] | None = None  # Per part; longer parts are dropped or truncated.
  train: bool = True  # Too long: the example is dropped (train) or its parts truncated (eval).
  suffix: tuple[int, ...] = ()  # Ids appended to every part (eos after each sentence of a stream).
  strip_empty: bool = False  # Strip each text; skip an example whose text is then empty.

  def describe(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)


def folder(config, tokenizer, split: str, recipe: Recipe) -> str:
  """Where the prepared ids of (config's corpus, split, tokenizer, recipe) live."""
  builder = builders.get_builder(config)
  key = json.dumps([FORMAT_VERSION, os.fspath(builder.data_path), split, tokenizer.fingerprint(),
                    recipe.describe()])
  digest = hashlib.sha256(key.encode()).hexdigest()[:16]
  return os.path.join(os.fspath(builder.data_path), 'token_ids', f'{split}-{digest}')


def load(config, tokenizer, split: str, recipe: Recipe) -> 'Examples':
  """The split's examples under recipe, preparing them first if no complete folder exists."""
  path = folder(config, tokenizer, split, recipe)
  if not is_complete(path):
    prepare(config, tokenizer, split, recipe, path)
  examples = Examples(path)
  counts = examples.metadata['counts']
  logging.info('%s %s: %s %d of %d examples longer than %s tokens, skipped %d empty; %d examples '
               'of %s tokens in %s.', config.dataset, split,
               'dropped' if recipe.train else 'truncated', counts['too_long'],
               counts['records'] - counts['empty'], recipe.max_lens, counts['empty'],
               counts['examples'], '+'.join(map(str, counts['tokens'])), path)
  return examples


def is_complete(path: str) -> bool:
  return os.path.exists(os.path.join(path, 'metadata.json'))


# --- Preparation ---------------------------------------------------------------------------------

class _Job:
  """One worker's reader and tokenizer (opened once per process) and the recipe to apply."""

  def __init__(self, config, tokenizer, split: str, recipe: Recipe, chunk_dir: str, dtype: str):
    self.source = builders.get_builder(config).as_data_source(split)
    self.tokenizer, self.recipe, self.chunk_dir, self.dtype = tokenizer, recipe, chunk_dir, dtype

  def run(self, chunk: tuple[int, int, int, int]) -> None:
    """Tokenizes records [start, stop) under pass `pass_index` into chunk file number `index`."""
    index, pass_index, start, stop = chunk
    recipe, fields = self.recipe, self.recipe.passes[pass_index]
    records = builders.read_records(self.source, range(start, stop))
    text_bytes = sum(len(record[field]) for record in records for field in fields)
    texts = [[record[field].decode('utf-8') for record in records] for field in fields]
    empty = 0
    if recipe.strip_empty:
      rows = list(zip(*(map(str.strip, part) for part in texts)))
      kept = [row for row in rows if all(row)]
      empty = len(rows) - len(kept)
      texts = [list(part) for part in zip(*kept)] if kept else [[] for _ in fields]
    parts = [[ids + list(recipe.suffix) for ids in self.tokenizer.encode_batch(part)]
             for part in texts]
    too_long = 0
    if recipe.max_lens:
      examples = list(zip(*parts))
      long = [any(len(p) > n for p, n in zip(e, recipe.max_lens)) for e in examples]
      too_long = sum(long)
      if recipe.train:
        examples = [e for e, is_long in zip(examples, long) if not is_long]
      else:
        examples = [tuple(p[:n] for p, n in zip(e, recipe.max_lens)) for e in examples]
      parts = [list(part) for part in zip(*examples)] if examples else [[] for _ in fields]
    arrays = {}
    for j, part in enumerate(parts):
      arrays[f'lengths_{j}'] = np.array([len(ids) for ids in part], np.int64)
      arrays[f'tokens_{j}'] = np.fromiter(itertools.chain.from_iterable(part), self.dtype,
                                          int(arrays[f'lengths_{j}'].sum()))
    arrays['counts'] = np.array([stop - start, len(parts[0]), too_long, empty, text_bytes],
                                np.int64)
    path = _chunk_path(self.chunk_dir, index)
    with open(f'{path}.tmp{os.getpid()}', 'wb') as f:  # A chunk file is whole or absent.
      np.savez(f, **arrays)
    os.replace(f'{path}.tmp{os.getpid()}', path)


def _chunk_path(chunk_dir: str, index: int) -> str:
  return os.path.join(chunk_dir, f'chunk-{index:06d}.npz')


_worker_job: _Job | None = None  # Set in each worker process by _start_worker.


def _start_worker(config_dict: dict, *job_args):
  global _worker_job  # pylint: disable=global-statement
  config = ml_collections.ConfigDict(config_dict)
  _worker_job = _Job(config, tokenizers.get_tokenizer(config), *job_args)


def _run_in_worker(chunk):
  _worker_job.run(chunk)


def workers_for(config, num_records: int) -> int:
  """config.prepare_workers, or (0) one per core for a split of PARALLEL_MIN_RECORDS or more."""
  if config.prepare_workers:
    return config.prepare_workers
  return (os.cpu_count() or 1) if num_records >= PARALLEL_MIN_RECORDS else 1


def prepare(config, tokenizer, split: str, recipe: Recipe, path: str,
            shard: tuple[int, int] = (0, 1)) -> bool:
  """Tokenizes the split into path (see the module docstring); resumes a stopped preparation.

  shard=(i, n): only chunks i, i+n, i+2n, ... and no merge, so that n machines sharing the
  filesystem prepare one corpus together; a run without a shard then merges. Returns whether
  the folder is complete.
  """
  builder = builders.get_builder(config)
  num_records = len(builder.as_data_source(split))
  partial = f'{path}.partial'
  chunk_dir = os.path.join(partial, 'chunks')
  os.makedirs(chunk_dir, exist_ok=True)
  chunks = []  # (file number, pass, first record, end record)
  for pass_index in range(len(recipe.passes)):
    for start in range(0, num_records, CHUNK_RECORDS):
      chunks.append((len(chunks), pass_index, start, min(start + CHUNK_RECORDS, num_records)))
  todo = [c for c in chunks if c[0] % shard[1] == shard[0] and
          not os.path.exists(_chunk_path(chunk_dir, c[0]))]
  dtype = 'uint16' if tokenizer.vocab_size <= 2**16 else 'int32'
  workers = min(workers_for(config, num_records * len(recipe.passes)), max(len(todo), 1))
  logging.info('Preparing token ids of %s %s (%d records, %d of %d chunks to do, %d worker%s) '
               'in %s.', config.dataset, split, num_records, len(todo), len(chunks), workers,
               's' if workers > 1 else '', partial)
  job_args = (split, recipe, chunk_dir, dtype)
  if workers > 1:
    context = multiprocessing.get_context('spawn')  # Forking a process that runs JAX is unsafe.
    with context.Pool(workers, _start_worker, (config.to_dict(), *job_args)) as pool:
      for _ in pool.imap_unordered(_run_in_worker, todo):
        pass
  else:
    job = _Job(config, tokenizer, *job_args)
    for chunk in todo:
      job.run(chunk)
  if shard[1] > 1:
    return False
  _merge(chunks, chunk_dir, partial, len(recipe.passes[0]), dtype, recipe)
  shutil.rmtree(chunk_dir)
  os.replace(partial, path)
  return True


def _merge(chunks, chunk_dir: str, out_dir: str, num_parts: int, dtype: str, recipe: Recipe):
  """Concatenates the chunk files, in order, into tokens_J.npy and offsets_J.npy per part J."""
  paths = [_chunk_path(chunk_dir, c[0]) for c in chunks]
  lengths = [[] for _ in range(num_parts)]
  counts = np.zeros(len(COUNTS), np.int64)
  for path in paths:  # First pass: sizes only (npz members load lazily).
    with np.load(path) as chunk:
      for j in range(num_parts):
        lengths[j].append(chunk[f'lengths_{j}'])
      counts += chunk['counts']
  tokens_per_part = []
  for j in range(num_parts):
    part_lengths = np.concatenate(lengths[j]) if lengths[j] else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(part_lengths)]).astype(np.int64)
    np.save(os.path.join(out_dir, f'offsets_{j}.npy'), offsets)
    total = int(offsets[-1])
    tokens_per_part.append(total)
    tokens = np.lib.format.open_memmap(os.path.join(out_dir, f'tokens_{j}.npy'), 'w+', dtype,
                                       (total,))
    at = 0
    for path in paths:  # Second pass: one chunk in memory at a time.
      with np.load(path) as chunk:
        part = chunk[f'tokens_{j}']
      tokens[at:at + len(part)] = part
      at += len(part)
    tokens.flush()
    del tokens
  metadata = {'recipe': dataclasses.asdict(recipe), 'dtype': dtype,
              'counts': {**dict(zip(COUNTS, map(int, counts))), 'tokens': tokens_per_part}}
  with open(os.path.join(out_dir, 'metadata.json'), 'w', encoding='utf-8') as f:
    json.dump(metadata, f, indent=1)


# --- Reading -------------------------------------------------------------------------------------

class _ArrayFile:
  """A 1-D .npy file read by slices with pread, not mapped into memory: a mapped file's pages count
  against the process (up to the file's size as training reads all of it; here each shuffled row
  mapped 2 MB), while a read keeps memory flat whatever the corpus size."""

  def __init__(self, path: str):
    self.path = path
    with open(path, 'rb') as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      (self.size,), _, self.dtype = read_header(f)
      self.start = f.tell()
    self._fd, self._pid = None, None

  def __getstate__(self):  # Each process (grain's workers too) opens the file itself.
    return {**self.__dict__, '_fd': None, '_pid': None}

  def read(self, start: int, stop: int) -> np.ndarray:
    if self._pid != os.getpid():
      self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
    size, stop = self.dtype.itemsize, min(stop, self.size)
    return np.frombuffer(os.pread(self._fd, (stop - start) * size, self.start + start * size),
                         self.dtype)


class Examples:
  """The prepared examples of one folder: examples[i] = tuple of int32 arrays, one per part."""

  def __init__(self, path: str):
    self.path = path
    with open(os.path.join(path, 'metadata.json'), encoding='utf-8') as f:
      self.metadata = json.load(f)
    num_parts = len(self.metadata['counts']['tokens'])
    self.parts = [(_ArrayFile(os.path.join(path, f'tokens_{j}.npy')),
                   _ArrayFile(os.path.join(path, f'offsets_{j}.npy'))) for j in range(num_parts)]

  def __len__(self) -> int:
    return self.metadata['counts']['examples']

  def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
    if not 0 <= index < len(self):
      raise IndexError(index)
    return tuple(tokens.read(*offsets.read(index, index + 2)).astype(np.int32)
                 for tokens, offsets in self.parts)


class Windows:
  """Windows of size+1 consecutive ids of a stream, starting every `size` ids (inputs and targets
  of a language model). Train: full windows only; eval: the last one may be shorter."""

  def __init__(self, examples: Examples, size: int, train: bool):
    self.examples, self.size = examples, size
    total = examples.metadata['counts']['tokens'][0]
    self.num_tokens = total
    self._len = (total - 1) // size if train else math.ceil((total - 1) / size)

  def __len__(self) -> int:
    return max(self._len, 0)

  def __getitem__(self, index: int) -> np.ndarray:
    if not 0 <= index < len(self):
      raise IndexError(index)
    start = index * self.size
    return self.examples.parts[0][0].read(start, start + self.size + 1).astype(np.int32)



class Streams:
  """Windows as continuous streams, for a Transformer-XL memory: the windows cut into
  num_streams runs of equal length, one after another (the remainder dropped); item
  t * count + r is window t of stream first + r. Batched by count, row r of each batch continues
  row r of the batch before. Repeated, each epoch starts the streams over: once an epoch, a
  row's memory carries the end of its stream into the start."""

  def __init__(self, windows: Windows, num_streams: int, first: int, count: int):
    self.windows, self.first, self.count = windows, first, count
    self.per_stream = len(windows) // num_streams

  def __len__(self) -> int:
    return self.per_stream * self.count

  def __getitem__(self, index: int) -> np.ndarray:
    if not 0 <= index < len(self):
      raise IndexError(index)
    step, row = divmod(index, self.count)
    return self.windows[(self.first + row) * self.per_stream + step]
