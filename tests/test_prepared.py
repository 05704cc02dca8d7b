"""Prepared token ids: resumable, parallel, keyed by every setting that changes the ids.

Each test writes its own tiny corpus and checks the prepared examples against the tokenizer applied
to the lines it wrote.
"""

import os

import numpy as np
import pytest

from configs import bert_mlm, original
from transformer import data
from transformer.data import prepared
from transformer.data.tokenizer import CharTokenizer

LINES = [f'line {i} {"la " * (i % 7)}end' for i in range(30)]


@pytest.fixture
def corpus(tmp_path):
  path = tmp_path / 'corpus.txt'
  path.write_text(''.join(f'{line}\n' for line in LINES))
  return str(path)


def mono_config(data_dir, corpus, **overrides):
  config = bert_mlm.get_config('tiny')
  config.update(dict(data_dir=str(data_dir), dataset='text', text_train_files=corpus,
                     tokenizer='char', **overrides))
  return config


RECIPE = prepared.Recipe(passes=(('text',),), max_lens=(14,), train=True, strip_empty=True)


def expected(tokenizer, max_len=14):
  return [tokenizer.encode(line) for line in LINES if len(tokenizer.encode(line)) <= max_len]


def as_lists(examples):
  return [examples[i][0].tolist() for i in range(len(examples))]


def folder_arrays(path):
  return {name: np.load(os.path.join(path, name)) for name in sorted(os.listdir(path))
          if name.endswith('.npy')}


def test_interrupted_preparation_resumes_to_identical_files(tmp_path, corpus, monkeypatch):
  monkeypatch.setattr(prepared, 'CHUNK_RECORDS', 4)  # 30 records: chunks 0..7.
  clean_config = mono_config(tmp_path / 'clean', corpus)
  tokenizer = data.get_tokenizer(clean_config)
  clean = prepared.load(clean_config, tokenizer, 'train', RECIPE)
  assert as_lists(clean) == expected(tokenizer)

  config = mono_config(tmp_path / 'interrupted', corpus)
  run, ran, killed = prepared._Job.run, [], []

  def killed_at_chunk_3(job, chunk):
    ran.append(chunk[0])
    if chunk[0] == 3 and not killed:
      killed.append(chunk[0])
      raise KeyboardInterrupt  # As a Ctrl-C or preemption between two chunks.
    run(job, chunk)

  monkeypatch.setattr(prepared._Job, 'run', killed_at_chunk_3)
  with pytest.raises(KeyboardInterrupt):
    prepared.load(config, data.get_tokenizer(config), 'train', RECIPE)
  path = prepared.folder(config, tokenizer, 'train', RECIPE)
  assert not os.path.exists(path)  # Nothing half-prepared under the final name.
  ran.clear()
  resumed = prepared.load(config, data.get_tokenizer(config), 'train', RECIPE)
  assert ran == [3, 4, 5, 6, 7]  # Chunks 0-2 were kept, not redone.
  assert resumed.metadata == clean.metadata
  clean_arrays, resumed_arrays = folder_arrays(clean.path), folder_arrays(resumed.path)
  assert clean_arrays.keys() == resumed_arrays.keys() == {'offsets_0.npy', 'tokens_0.npy'}
  for name, array in clean_arrays.items():
    np.testing.assert_array_equal(resumed_arrays[name], array)


def test_parallel_workers_prepare_the_same_files(tmp_path, corpus, monkeypatch):
  monkeypatch.setattr(prepared, 'CHUNK_RECORDS', 4)  # Chunks are cut here, in the parent.
  results = []
  for workers in (1, 2):
    config = mono_config(tmp_path / f'workers{workers}', corpus, prepare_workers=workers)
    results.append(prepared.load(config, data.get_tokenizer(config), 'train', RECIPE))
  one, two = (folder_arrays(r.path) for r in results)
  assert one.keys() == two.keys()
  for name, array in one.items():
    np.testing.assert_array_equal(two[name], array)
  assert as_lists(results[1]) == expected(data.get_tokenizer(config))


def test_changed_length_or_tokenizer_prepares_again(tmp_path, corpus):
  config = mono_config(tmp_path / 'prepared', corpus)
  tokenizer = data.get_tokenizer(config)
  short = prepared.load(config, tokenizer, 'train', RECIPE)
  longer_recipe = prepared.Recipe(passes=(('text',),), max_lens=(20,), train=True,
                                  strip_empty=True)
  longer = prepared.load(config, tokenizer, 'train', longer_recipe)
  assert as_lists(short) == expected(tokenizer, 14)
  assert as_lists(longer) == expected(tokenizer, 20)
  assert len(longer) > len(short)

  # Another vocabulary (the same characters in another order) gives other ids for the same text.
  reversed_chars = CharTokenizer(tokenizer.chars[::-1])
  relabelled = prepared.load(config, reversed_chars, 'train', RECIPE)
  assert as_lists(relabelled) == expected(reversed_chars, 14) != as_lists(short)


def test_translation_pipeline_reads_prepared_pairs(tmp_path):
  """End to end through make_eval_batches: truncation on eval, pairs aligned, file order kept."""
  source, target = tmp_path / 's.de', tmp_path / 't.en'
  source.write_text(''.join(f'quelle {i}{"x" * (3 * i)}\n' for i in range(10)))
  target.write_text(''.join(f'target {i}\n' for i in range(10)))
  config = original.get_config('tiny')
  config.update(dict(data_dir=str(tmp_path / 'prepared'), dataset='text', tokenizer='char',
                     text_train_files=f'{source}:{target}', text_eval_files=f'{source}:{target}',
                     max_source_len=12, eval_batch_size=4))
  tokenizer = data.get_tokenizer(config)
  batches = data.make_eval_batches(config, tokenizer)
  sources = [tokenizer.decode(row) for b in batches for row in b['inputs']][:10]
  assert sources == [f'quelle {i}{"x" * (3 * i)}'[:12] for i in range(10)]
  targets = [tokenizer.decode(row) for b in batches for row in b['targets']][:10]
  assert targets == [f'target {i}' for i in range(10)]


def test_machines_prepare_disjoint_chunks_then_one_merges(tmp_path, corpus, monkeypatch):
  monkeypatch.setattr(prepared, 'CHUNK_RECORDS', 4)
  config = mono_config(tmp_path / 'prepared', corpus)
  tokenizer = data.get_tokenizer(config)
  path = prepared.folder(config, tokenizer, 'train', RECIPE)
  run, ran = prepared._Job.run, []
  monkeypatch.setattr(prepared._Job, 'run', lambda job, chunk: ran.append(chunk[0]) or
                      run(job, chunk))
  for index in (1, 0):
    assert not prepared.prepare(config, tokenizer, 'train', RECIPE, path, shard=(index, 2))
  assert ran == [1, 3, 5, 7, 0, 2, 4, 6] and not os.path.exists(path)
  merged = prepared.load(config, tokenizer, 'train', RECIPE)
  assert ran == [1, 3, 5, 7, 0, 2, 4, 6]  # The merge tokenized nothing again.
  assert as_lists(merged) == expected(tokenizer)
