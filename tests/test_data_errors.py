"""Bad input gives a clear error naming the file; empty lines are skipped and counted."""

import logging
import os

import pytest

from configs import bert_mlm, common, gpt_causal, original
from transformer import data
from transformer.data import builders


def text_config(module, tmp_path, train_files, eval_files=None, **overrides):
  config = module.get_config('tiny')
  config.data_dir = str(tmp_path / 'prepared')
  config.dataset = 'text'
  config.tokenizer = 'char'
  config.text_train_files = train_files
  config.text_eval_files = eval_files
  for key, value in overrides.items():
    config[key] = value
  return config


def write(path, content: bytes | str) -> str:
  mode = 'wb' if isinstance(content, bytes) else 'w'
  with open(path, mode) as f:
    f.write(content)
  return str(path)


def test_parallel_files_with_different_line_counts(tmp_path):
  source = write(tmp_path / 'a.de', 'eins\nzwei\ndrei\n')
  target = write(tmp_path / 'a.en', 'one\ntwo\n')
  with pytest.raises(ValueError, match=r'a\.de has 3 lines, .*a\.en has 2'):
    builders.prepare(text_config(original, tmp_path, f'{source}:{target}'))


def test_empty_file(tmp_path):
  path = write(tmp_path / 'empty.txt', '\n  \n')
  with pytest.raises(ValueError, match=r'empty\.txt: the file is empty'):
    builders.prepare(text_config(bert_mlm, tmp_path, path))


def test_invalid_utf8_names_file_and_line(tmp_path):
  path = write(tmp_path / 'latin1.txt', b'fine\nstill fine\n' + 'caf\xe9\n'.encode('latin-1'))
  with pytest.raises(ValueError, match=r'latin1\.txt, line 3: invalid UTF-8'):
    builders.prepare(text_config(bert_mlm, tmp_path, path))


def test_missing_text_file(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'nowhere\.txt: no such file'):
    builders.prepare(text_config(bert_mlm, tmp_path, str(tmp_path / 'nowhere.txt')))


def offline(url, timeout_s=10.0):
  raise OSError(f'{url} unreachable (simulated)')


@pytest.mark.parametrize('dataset', ['multi30k', 'tiny_shakespeare'])
def test_missing_raw_directory_says_where_it_looked_and_how_to_fix(tmp_path, monkeypatch,
                                                                   dataset):
  monkeypatch.setattr(builders, '_check_reachable', offline)  # Whether or not there is a network.
  config = original.get_config('tiny') if dataset == 'multi30k' else gpt_causal.get_config('tiny')
  config.data_dir = str(tmp_path / 'prepared')
  config.raw_data_dir = str(tmp_path / 'no_such_raw_dir')
  with pytest.raises(FileNotFoundError) as error:
    builders.prepare(config)
  message = str(error.value)
  assert config.raw_data_dir in message and 'no such directory' in message
  assert '--config.raw_data_dir=DIR' in message and 'https://raw.githubusercontent.com' in message


def test_raw_directory_with_missing_files_lists_them(tmp_path, monkeypatch):
  monkeypatch.setattr(builders, '_check_reachable', offline)
  raw = tmp_path / 'raw'
  (raw / 'multi30k').mkdir(parents=True)
  write(raw / 'multi30k' / 'train.de', 'Hallo\n')
  config = original.get_config('tiny')
  config.data_dir, config.raw_data_dir = str(tmp_path / 'prepared'), str(raw)
  with pytest.raises(FileNotFoundError, match=r'multi30k \(missing train\.en, val\.de'):
    builders.prepare(config)


def test_empty_lines_are_skipped_and_counted(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  mono = write(tmp_path / 'mono.txt', 'first\n\n  \nsecond\nthird\n')
  source = write(tmp_path / 'p.de', 'eins\n\nzwei\ndrei\n')
  target = write(tmp_path / 'p.en', 'one\ntwo\n\nthree\n')

  config = text_config(bert_mlm, tmp_path, mono, block_size=16)
  assert [e['text'] for e in builders.load_split(config, 'train')] == ['first', 'second', 'third']
  assert 'mono.txt: skipped 2 empty lines of 5.' in caplog.text
  batch = next(data.make_train_iterator(config, data.get_tokenizer(config)))
  assert batch['inputs'].shape == (16, 16)

  config = text_config(original, tmp_path, f'{source}:{target}')
  assert data.load_text_pairs(config, 'train') == [('eins', 'one'), ('drei', 'three')]
  assert 'skipped 2 of 4 line pairs with an empty side' in caplog.text


def test_length_filtering_is_logged(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  source = write(tmp_path / 'p.de', 'kurz\n' + 'x' * 30 + '\nauch kurz\n')
  target = write(tmp_path / 'p.en', 'short\nlong enough\n' + 'y' * 30 + '\n')
  config = text_config(original, tmp_path, f'{source}:{target}', f'{source}:{target}',
                       batch_size=2, eval_batch_size=2)
  tokenizer = data.get_tokenizer(config)
  batch = next(data.make_train_iterator(config, tokenizer))
  assert 'dropped 2 of 3 examples longer than (24, 24) tokens' in caplog.text
  assert tokenizer.decode(batch['inputs'][0]) == 'kurz'
  eval_batches = data.make_eval_batches(config, tokenizer)  # Eval truncates, keeps all 3.
  assert 'truncated 2 of 3 examples' in caplog.text
  assert sum(int((b['weights'].sum(axis=1) > 0).sum()) for b in eval_batches) == 3


def test_monolingual_data_for_translation_is_refused(tmp_path):
  config = text_config(original, tmp_path, write(tmp_path / 'mono.txt', 'a\nb\n'))
  with pytest.raises(ValueError, match='original needs parallel data'):
    data.make_train_iterator(config, data.get_tokenizer(config))


def test_unsupported_packing_is_refused(tmp_path):
  config = text_config(gpt_causal, tmp_path, write(tmp_path / 'mono.txt', 'abc\n' * 50),
                       packing=True, block_size=8)
  with pytest.raises(ValueError,
                     match='packing applies to original, bert_mlm, unilm_prefix, not gpt_causal'):
    data.make_train_iterator(config, data.get_tokenizer(config))


def test_raw_dir_may_hold_the_files_directly(tmp_path):
  """raw_data_dir may be the folder of input.txt itself (no tinyshakespeare/ level)."""
  raw = tmp_path / 'raw'
  raw.mkdir()
  text = 'To be, or not to be: that is the question.\n' * 30
  write(raw / 'input.txt', text)
  config = gpt_causal.get_config('tiny')
  config.data_dir, config.raw_data_dir = str(tmp_path / 'prepared'), str(raw)
  for split, expected in (('train', text[:int(0.9 * len(text))]),
                          ('validation', text[int(0.9 * len(text)):])):
    assert ''.join(e['text'] for e in builders.load_split(config, split)) == expected


class FakeDownloadManager:
  """Stands in for tfds' download manager: 'downloads' are local files."""

  def __init__(self, files: dict[str, str]):
    self.files = files

  def download_and_extract(self, urls: dict[str, str]) -> dict[str, str]:
    return {name: self.files[name] for name in urls}


def test_downloads_are_verified_against_checksums(tmp_path, monkeypatch):
  monkeypatch.setattr(builders, '_check_reachable', lambda url, timeout_s=10.0: None)
  urls = {'input.txt': builders.SHAKESPEARE_URL}
  good = os.path.join(common.SHARED_DATA, 'tinyshakespeare', 'input.txt')
  if os.path.exists(good):
    assert builders.locate_raw_files('tiny_shakespeare', 'tinyshakespeare', None, urls,
                                     builders.SHAKESPEARE_SHA256,
                                     FakeDownloadManager({'input.txt': good})) == {
                                         'input.txt': good}
  tampered = write(tmp_path / 'input.txt', 'First Citizen:\nBefore we proceed\n')
  with pytest.raises(FileNotFoundError, match=r'checksum mismatch for https://raw\.github'):
    builders.locate_raw_files('tiny_shakespeare', 'tinyshakespeare', None, urls,
                              builders.SHAKESPEARE_SHA256,
                              FakeDownloadManager({'input.txt': tampered}))
