"""TFDS builders for the project's corpora: array_record files, read back without TensorFlow.

Three builders, each reading raw files from a directory (config.raw_data_dir) and, for the public
corpora, falling back to a checksummed download through the TFDS download manager:
- Multi30k: English-German caption pairs, features {'de', 'en'}; splits train/validation/test
  (= the raw files train / val / test_2016_flickr).
- TinyShakespeare: one running text; train = first 90% of the characters, validation = the rest.
  Each example is one line *with* its newline, so joining a split's examples gives its exact text.
- TextLines: a user's own files, one example per line: monolingual ({'text'}) or parallel line
  pairs ({'source', 'target'}); config.text_train_files / config.text_eval_files.
Lines are stripped (except the running text); empty lines (a pair with either side empty) are
skipped and the count is logged. Examples keep the raw file order (shuffling happens in grain).
"""

import dataclasses
import hashlib
import os
import urllib.request

from absl import logging
import tensorflow_datasets as tfds

from transformer import errors

MULTI30K_URL = 'https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/{}.gz'
MULTI30K_SPLIT_FILES = {'train': 'train', 'validation': 'val', 'test': 'test_2016_flickr'}
MULTI30K_LANGS = ('de', 'en')
# sha256 of the decompressed files (the same as /work/shared/data/multi30k/SHA256SUMS).
MULTI30K_SHA256 = {
    'train.de': '2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72',
    'train.en': '460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6',
    'val.de': '660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660',
    'val.en': '1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227',
    'test_2016_flickr.de': '4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16',
    'test_2016_flickr.en': '399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182',
}
SHAKESPEARE_URL = ('https://raw.githubusercontent.com/karpathy/char-rnn/master/data/'
                   'tinyshakespeare/input.txt')
SHAKESPEARE_SHA256 = {
    'input.txt': '86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed'}
SHAKESPEARE_TRAIN_FRACTION = 0.9
RUNNING_TEXT_DATASETS = ('tiny_shakespeare',)  # Examples are pieces of one text, not sentences.


# --- Reading raw files ---------------------------------------------------------------------------

def read_text(path: str) -> str:
  """The whole file as str; errors name the file (and the line, for invalid UTF-8)."""
  with open(path, 'rb') as f:
    data = f.read()
  if not data.strip():
    raise errors.ConfigError(f'{path}: the file is empty.')
  try:
    return data.decode('utf-8')
  except UnicodeDecodeError as e:
    line = data.count(b'\n', 0, e.start) + 1
    raise errors.ConfigError(f'{path}, line {line}: invalid UTF-8 ({e.reason}, byte '
                             f'{data[e.start]:#04x}).') from None


def read_lines(path: str) -> list[str]:
  """Stripped lines of a text file, empty ones included (so parallel files stay aligned)."""
  text = read_text(path)
  lines = text.split('\n')
  if text.endswith('\n'):
    lines.pop()  # The final newline ends the last line; it does not start an empty one.
  return [line.strip() for line in lines]


def read_monolingual(path: str) -> list[str]:
  """Non-empty stripped lines; empty ones are skipped and counted."""
  lines = read_lines(path)
  kept = [line for line in lines if line]
  if len(kept) < len(lines):
    logging.warning('%s: skipped %d empty lines of %d.', path, len(lines) - len(kept), len(lines))
  return kept


def read_parallel(source_path: str, target_path: str) -> list[tuple[str, str]]:
  """Aligned (source, target) line pairs; a pair with an empty side is skipped and counted."""
  sources, targets = read_lines(source_path), read_lines(target_path)
  if len(sources) != len(targets):
    raise errors.ConfigError(f'Parallel files differ in line count: {source_path} has '
                             f'{len(sources)} lines, {target_path} has {len(targets)}; line i of '
                             'one must translate line i of the other.')
  pairs = [(s, t) for s, t in zip(sources, targets) if s and t]
  if len(pairs) < len(sources):
    logging.warning('%s / %s: skipped %d of %d line pairs with an empty side.', source_path,
                    target_path, len(sources) - len(pairs), len(sources))
  return pairs


def _sha256(path) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def _check_reachable(url: str, timeout_s: float = 10.0):
  """Fails fast when offline (the download manager retries for minutes before giving up)."""
  urllib.request.urlopen(urllib.request.Request(url, method='HEAD'), timeout=timeout_s).close()


def locate_raw_files(dataset: str, folder: str, raw_data_dir: str | None, urls: dict[str, str],
                     sha256: dict[str, str], dl_manager) -> dict[str, str]:
  """Paths of the raw files {name: path}: from raw_data_dir if there, else downloaded and checked.

  Looks in raw_data_dir/folder/ and raw_data_dir/ itself; downloads each url (a .gz is
  decompressed) and compares its sha256 with the expected one. Where neither works, the error says
  where it looked and how to point the builder at the files.
  """
  looked = []
  for directory in ([os.path.join(raw_data_dir, folder), raw_data_dir] if raw_data_dir else []):
    paths = {name: os.path.join(directory, name) for name in urls}
    missing = [name for name, path in paths.items() if not os.path.isfile(path)]
    if not missing:
      return paths
    looked.append(f'{directory} ' + ('(no such directory)' if not os.path.isdir(directory)
                                     else f'(missing {", ".join(missing)})'))
  try:
    _check_reachable(next(iter(urls.values())))
    paths = {name: os.fspath(path) for name, path in dl_manager.download_and_extract(urls).items()}
    for name, path in paths.items():
      if _sha256(path) != sha256[name]:
        raise ValueError(f'checksum mismatch for {urls[name]} (downloaded to {path}): sha256 '
                         f'{_sha256(path)}, expected {sha256[name]}')
    return paths
  except Exception as e:  # pylint: disable=broad-except
    where = '; '.join(looked) if looked else 'nowhere locally (config.raw_data_dir is unset)'
    raise errors.MissingError(
        f'{dataset}: raw files {", ".join(urls)} not found. Looked in: {where}. Download from '
        f'the public source ({next(iter(urls.values()))}, ...) failed ({type(e).__name__}: '
        f'{e}). Put the files in a directory DIR (as DIR/{folder}/<file> or DIR/<file>) and run '
        f'with --config.raw_data_dir=DIR.') from e


# --- Builders ------------------------------------------------------------------------------------

class _RawBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder that takes its raw-data directory as an argument; always array_record."""

  VERSION = tfds.core.Version('1.0.0')
  FEATURES: tuple[str, ...] = ()

  def __init__(self, *, raw_data_dir: str | None = None, **kwargs):
    self.raw_data_dir = raw_data_dir
    super().__init__(file_format='array_record', **kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, disable_shuffling=True,  # Keep file order: eval and references line up.
        features=tfds.features.FeaturesDict({k: tfds.features.Text() for k in self._features()}))

  def _features(self) -> tuple[str, ...]:
    return self.FEATURES

  def _generate_examples(self, examples):
    for i, example in enumerate(examples):
      yield i, example


class Multi30k(_RawBuilder, skip_registration=True):
  """Multi30k task 1 (Elliott et al. 2016): 29,000 / 1,014 / 1,000 German-English caption pairs."""

  FEATURES = MULTI30K_LANGS

  def _split_generators(self, dl_manager):
    names = [f'{stem}.{lang}' for stem in MULTI30K_SPLIT_FILES.values() for lang in MULTI30K_LANGS]
    paths = locate_raw_files('multi30k', 'multi30k', self.raw_data_dir,
                             {name: MULTI30K_URL.format(name) for name in names},
                             MULTI30K_SHA256, dl_manager)
    return {split: self._generate_examples(
        dict(zip(MULTI30K_LANGS, pair)) for pair in
        read_parallel(paths[f'{stem}.de'], paths[f'{stem}.en']))
            for split, stem in MULTI30K_SPLIT_FILES.items()}


class TinyShakespeare(_RawBuilder, skip_registration=True):
  """Tiny Shakespeare (char-rnn): examples are lines with their newline; 90% / 10% of characters."""

  FEATURES = ('text',)

  def _split_generators(self, dl_manager):
    path = locate_raw_files('tiny_shakespeare', 'tinyshakespeare', self.raw_data_dir,
                            {'input.txt': SHAKESPEARE_URL}, SHAKESPEARE_SHA256,
                            dl_manager)['input.txt']
    text = read_text(path)
    cut = int(len(text) * SHAKESPEARE_TRAIN_FRACTION)  # As nanoGPT's shakespeare_char.
    return {split: self._generate_examples({'text': line} for line in part.splitlines(True))
            for split, part in (('train', text[:cut]), ('validation', text[cut:]))}


@dataclasses.dataclass(eq=False)
class TextLinesConfig(tfds.core.BuilderConfig):
  """Files of one corpus: each entry is a path (monolingual) or a (source, target) pair of paths."""
  train_files: tuple = ()
  eval_files: tuple = ()

  @property
  def parallel(self) -> bool:
    return isinstance(self.train_files[0], tuple)


class TextLines(_RawBuilder, skip_registration=True):
  """A user's own text files, one example per line (see parse_text_files for the syntax)."""

  def _features(self):
    return ('source', 'target') if self.builder_config.parallel else ('text',)

  def _split_generators(self, dl_manager):
    del dl_manager  # The user's files are local.
    splits = {'train': self.builder_config.train_files,
              'validation': self.builder_config.eval_files}
    return {split: self._generate_examples(self._read(files)) for split, files in splits.items()
            if files}

  def _read(self, files):
    for entry in files:
      if self.builder_config.parallel:
        yield from ({'source': s, 'target': t} for s, t in read_parallel(*entry))
      else:
        yield from ({'text': line} for line in read_monolingual(entry))


def parse_text_files(spec: str | None) -> tuple:
  """'a.txt,b.txt' -> ('a.txt', 'b.txt'); 'a.de:a.en,b.de:b.en' -> (('a.de', 'a.en'), ...)."""
  if not spec:
    return ()
  entries = []
  for item in spec.split(','):
    paths = tuple(os.path.abspath(os.path.expanduser(p.strip())) for p in item.split(':'))
    if len(paths) > 2:
      raise errors.ConfigError(f'{item!r}: give one file, or source:target for parallel data.')
    for path in paths:
      if not os.path.isfile(path):
        raise errors.MissingError(f'{path}: no such file (from config.text_train_files / '
                                  'text_eval_files).')
    entries.append(paths if len(paths) == 2 else paths[0])
  if len({isinstance(e, tuple) for e in entries}) > 1:
    raise errors.ConfigError(f'{spec!r}: mixes monolingual files and source:target pairs.')
  return tuple(entries)


def _text_lines_config(config) -> TextLinesConfig:
  train_files = parse_text_files(config.text_train_files)
  if not train_files:
    raise errors.ConfigError('dataset=text needs --config.text_train_files (comma-separated '
                             'files; source:target pairs for parallel data).')
  eval_files = parse_text_files(config.text_eval_files)
  if eval_files and isinstance(eval_files[0], tuple) != isinstance(train_files[0], tuple):
    raise errors.ConfigError('text_train_files and text_eval_files must both be monolingual or '
                             'both parallel.')
  # The prepared data is cached under a name that changes when any file (or its content) does.
  key = hashlib.sha256(repr((train_files, eval_files)).encode())
  for entry in train_files + eval_files:
    for path in entry if isinstance(entry, tuple) else (entry,):
      stat = os.stat(path)
      key.update(f'{stat.st_size} {stat.st_mtime_ns};'.encode())
  return TextLinesConfig(name=f'files_{key.hexdigest()[:12]}', train_files=train_files,
                         eval_files=eval_files)


def get_builder(config) -> _RawBuilder:
  """The builder for config.dataset, reading raw files from config.raw_data_dir."""
  kwargs = dict(data_dir=config.data_dir, raw_data_dir=config.raw_data_dir)
  if config.dataset == 'multi30k':
    return Multi30k(**kwargs)
  if config.dataset == 'tiny_shakespeare':
    return TinyShakespeare(**kwargs)
  if config.dataset == 'text':
    return TextLines(config=_text_lines_config(config), **kwargs)
  raise errors.ConfigError(f'Unknown dataset {config.dataset!r}: multi30k | tiny_shakespeare | '
                           'text.')


def prepare(config) -> _RawBuilder:
  """Prepares the dataset once (a no-op when config.data_dir already holds it)."""
  builder = get_builder(config)
  builder.download_and_prepare()
  return builder


_split_cache: dict[tuple[str, str], list[dict[str, str]]] = {}


def load_split(config, split: str) -> list[dict[str, str]]:
  """All examples of a prepared split, in file order, as {feature: str} dicts (cached in memory)."""
  builder = prepare(config)
  if split not in builder.info.splits:
    raise errors.ConfigError(f'{config.dataset} has no {split!r} split; it has '
                             f'{", ".join(builder.info.splits)}' +
                             (' (set --config.text_eval_files for validation).'
                              if config.dataset == 'text' else '.'))
  key = (os.fspath(builder.data_path), split)
  if key not in _split_cache:  # Decoding the records costs about 1 s per 30k examples.
    source = builder.as_data_source(split)  # = tfds.data_source: an ArrayRecordDataSource.
    _split_cache[key] = [{k: v.decode('utf-8') for k, v in record.items()}
                         for record in source.__getitems__(range(len(source)))]
  return _split_cache[key]
