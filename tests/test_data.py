"""Data layer on the real corpora: prepared splits, tokenizers, batches of every objective.

The shared corpora (../shared/data) are prepared once per session in a tmp dir with tiny configs.
"""

import json
import os

from absl import flags
import numpy as np
import pytest

from configs import bert_mlm, common, gpt_causal, original, unilm_prefix
from tests import run_helpers
from transformer import data
from transformer.data import builders
from transformer.data.tokenizer import BOS_ID, CLS_ID, EOS_ID, MASK_ID, NUM_SPECIAL, SEP_ID

RAW = common.SHARED_DATA
pytestmark = run_helpers.needs_corpora('multi30k', 'tinyshakespeare')


def make_config(module, data_dir, **overrides):
  config = module.get_config('tiny')
  config.data_dir = str(data_dir)
  config.raw_data_dir = RAW
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('prepared')


@pytest.fixture(scope='session')
def spm_tokenizer(data_dir):
  return data.get_tokenizer(make_config(original, data_dir))


@pytest.fixture(scope='session')
def encoded_train_pairs(data_dir, spm_tokenizer):
  """{(source ids, target ids)} of multi30k train, de -> en."""
  pairs = data.load_text_pairs(make_config(original, data_dir), 'train')
  return {(tuple(spm_tokenizer.encode(s)), tuple(spm_tokenizer.encode(t))) for s, t in pairs}


@pytest.fixture(scope='session')
def small_corpus_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('small')


def small_config(module, data_dir, **overrides):
  """dataset=text on parallel files: multi30k val (1,014 pairs) as train, test_2016 as validation.

  Building pipelines on it takes milliseconds instead of seconds (tokenizing all of multi30k).
  """
  files = {split: ':'.join(os.path.join(RAW, 'multi30k', f'{stem}.{lang}') for lang in ('de', 'en'))
           for split, stem in (('train', 'val'), ('eval', 'test_2016_flickr'))}
  overrides = dict(dict(dataset='text', text_train_files=files['train'],
                        text_eval_files=files['eval'], tokenizer='sentencepiece'), **overrides)
  return make_config(module, data_dir, **overrides)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def segments(row_ids, row_values):
  """{segment id: values} of one packed row (segment 0 = padding left out)."""
  return {s: row_values[row_ids == s] for s in np.unique(row_ids) if s}


# --- Prepared data and tokenizers ----------------------------------------------------------------

def test_multi30k_splits_have_the_published_sizes_and_raw_text(data_dir):
  config = make_config(original, data_dir)
  splits = builders.prepare(config).info.splits
  assert {s: splits[s].num_examples for s in ('train', 'validation', 'test')} == {
      'train': 29000, 'validation': 1014, 'test': 1000}
  with open(os.path.join(RAW, 'multi30k', 'val.de'), encoding='utf-8') as f:
    raw_de = [line.strip() for line in f]
  with open(os.path.join(RAW, 'multi30k', 'val.en'), encoding='utf-8') as f:
    raw_en = [line.strip() for line in f]
  assert data.load_text_pairs(config, 'validation') == list(zip(raw_de, raw_en))
  config.source_lang, config.target_lang = 'en', 'de'
  assert data.load_text_pairs(config, 'validation') == list(zip(raw_en, raw_de))
  assert len(data.load_text_pairs(config, 'test')) == 1000


def test_sentencepiece_detokenizes_validation_exactly(data_dir, spm_tokenizer):
  config = make_config(original, data_dir)
  assert spm_tokenizer.vocab_size == config.vocab_size
  assert [spm_tokenizer.pad_id, spm_tokenizer.unk_id, spm_tokenizer.bos_id, spm_tokenizer.eos_id,
          spm_tokenizer.mask_id, spm_tokenizer.cls_id, spm_tokenizer.sep_id] == list(range(7))
  texts = [t for pair in data.load_text_pairs(config, 'validation') for t in pair]
  exact = sum(spm_tokenizer.decode(spm_tokenizer.encode(t)) == t for t in texts)
  assert exact / len(texts) >= 0.999, (exact, len(texts))
  # Special ids never come out of encode; decode skips them and stops at eos.
  ids = spm_tokenizer.encode(texts[0])
  assert min(ids) >= NUM_SPECIAL
  assert spm_tokenizer.decode([BOS_ID, *ids, EOS_ID, *ids]) == texts[0]


def test_unigram_sentencepiece_on_parallel_text_files(small_corpus_dir):
  """Unigram (slow on all of multi30k) on a user's parallel files."""
  config = small_config(original, small_corpus_dir, spm_model_type='unigram', vocab_size=300)
  tokenizer = data.get_tokenizer(config)
  assert tokenizer.model_path.endswith('spm_unigram_300.model') and tokenizer.vocab_size == 300
  texts = [t for pair in data.load_text_pairs(config, 'train') for t in pair]
  assert len(texts) == 2 * 1014
  exact = sum(tokenizer.decode(tokenizer.encode(t)) == t for t in texts)
  assert exact / len(texts) >= 0.999, (exact, len(texts))


def test_tokenizer_is_trained_once_and_reused(data_dir, spm_tokenizer):
  path = spm_tokenizer.model_path
  assert os.path.dirname(path) == os.fspath(builders.get_builder(
      make_config(original, data_dir)).data_path)
  mtime = os.path.getmtime(path)
  again = data.get_tokenizer(make_config(unilm_prefix, data_dir))  # Same corpus, other variant.
  assert again.model_path == path and os.path.getmtime(path) == mtime
  assert again.encode('Ein Hund läuft.') == spm_tokenizer.encode('Ein Hund läuft.')


def test_tiny_shakespeare_char_level_matches_nanogpt(data_dir):
  config = make_config(gpt_causal, data_dir)
  with open(os.path.join(RAW, 'tinyshakespeare', 'input.txt'), encoding='utf-8') as f:
    text = f.read()
  cut = int(len(text) * 0.9)
  train, validation = (''.join(e['text'] for e in builders.load_split(config, split))
                       for split in ('train', 'validation'))
  assert (train, validation) == (text[:cut], text[cut:])
  tokenizer = data.get_tokenizer(config)
  assert tokenizer.vocab_size == NUM_SPECIAL + 65  # nanoGPT's 65 characters + 7 special ids.
  assert tokenizer.decode(tokenizer.encode(validation)) == validation
  assert tokenizer.encode('\n')[0] == NUM_SPECIAL + sorted(set(text)).index('\n')


# --- Batches of each objective -------------------------------------------------------------------

def test_translation_batches(data_dir, spm_tokenizer, encoded_train_pairs):
  config = make_config(original, data_dir)
  batches = take(data.make_train_iterator(config, spm_tokenizer), 3)
  for batch in batches:
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        'inputs': ((16, 24), np.int32), 'decoder_inputs': ((16, 25), np.int32),
        'targets': ((16, 25), np.int32), 'weights': ((16, 25), np.float32)}
    np.testing.assert_array_equal(batch['weights'], batch['targets'] != 0)
    for inputs, decoder_inputs, targets in zip(batch['inputs'], batch['decoder_inputs'],
                                               batch['targets']):
      n = int(np.count_nonzero(targets))
      assert decoder_inputs[0] == BOS_ID and targets[n - 1] == EOS_ID
      np.testing.assert_array_equal(decoder_inputs[1:n], targets[:n - 1])
      source = tuple(inputs[inputs != 0])
      assert (source, tuple(targets[:n - 1])) in encoded_train_pairs


def test_packed_translation_batches(data_dir, spm_tokenizer, encoded_train_pairs):
  config = make_config(original, data_dir, packing=True, max_source_len=60, max_target_len=59)
  batch = next(data.make_train_iterator(config, spm_tokenizer))
  assert batch['inputs'].shape == batch['inputs_segment_ids'].shape == (16, 60)
  assert batch['decoder_inputs'].shape == batch['decoder_positions'].shape == (16, 60)
  num_segments = []
  for row in range(16):
    sources = segments(batch['inputs_segment_ids'][row], batch['inputs'][row])
    decoder = segments(batch['decoder_segment_ids'][row], batch['decoder_inputs'][row])
    targets = segments(batch['decoder_segment_ids'][row], batch['targets'][row])
    assert list(sources) == list(decoder) == list(range(1, len(sources) + 1))
    for s, source in sources.items():
      assert decoder[s][0] == BOS_ID and targets[s][-1] == EOS_ID
      assert (tuple(source), tuple(targets[s][:-1])) in encoded_train_pairs
      positions = batch['inputs_positions'][row][batch['inputs_segment_ids'][row] == s]
      np.testing.assert_array_equal(positions, np.arange(len(source)))
      positions = batch['decoder_positions'][row][batch['decoder_segment_ids'][row] == s]
      np.testing.assert_array_equal(positions, np.arange(len(decoder[s])))
    num_segments.append(len(sources))
    np.testing.assert_array_equal(batch['weights'][row], batch['decoder_segment_ids'][row] > 0)
  assert np.mean(num_segments) > 1.5 and (batch['inputs'] != 0).mean() > 0.7  # It packs.


def test_causal_lm_windows_are_contiguous_train_text(data_dir):
  config = make_config(gpt_causal, data_dir)
  tokenizer = data.get_tokenizer(config)
  train = ''.join(e['text'] for e in builders.load_split(config, 'train'))
  batch = next(data.make_train_iterator(config, tokenizer))
  assert batch['inputs'].shape == batch['targets'].shape == (16, 32)
  np.testing.assert_array_equal(batch['inputs'][:, 1:], batch['targets'][:, :-1])
  assert (batch['weights'] == 1).all()
  for inputs, targets in zip(batch['inputs'], batch['targets']):
    assert tokenizer.decode([*inputs, targets[-1]]) in train
  # Validation: every token after the first is predicted exactly once, in order.
  validation = ''.join(e['text'] for e in builders.load_split(config, 'validation'))
  eval_batches = data.make_eval_batches(config, tokenizer)
  predicted = np.concatenate([b['targets'][b['weights'] > 0] for b in eval_batches])
  np.testing.assert_array_equal(predicted, tokenizer.encode(validation)[1:])


def test_causal_lm_on_sentences_separates_them_with_eos(data_dir, spm_tokenizer):
  config = make_config(gpt_causal, data_dir, dataset='multi30k', tokenizer='sentencepiece',
                       lm_sides='en')
  batch = next(data.make_train_iterator(config, spm_tokenizer))
  assert (batch['inputs'] == EOS_ID).any(axis=1).mean() > 0.5  # Sentences are ~20 tokens.
  train_en = {tuple(spm_tokenizer.encode(p[1]))
              for p in data.load_text_pairs(make_config(original, data_dir), 'train')}
  for row in batch['inputs']:
    inner = np.split(row, np.flatnonzero(row == EOS_ID))[1:-1]  # Whole sentences, eos first.
    assert all(tuple(s[1:]) in train_en for s in inner)


def check_mlm_row(inputs, targets, weights, max_predictions):
  selected = weights > 0
  assert targets[0] == CLS_ID and SEP_ID in targets
  assert (targets[selected] >= NUM_SPECIAL).all()  # No special token is ever selected.
  np.testing.assert_array_equal(inputs[~selected], targets[~selected])
  assert selected.sum() <= max_predictions


def test_masked_lm_batches(data_dir, spm_tokenizer):
  config = make_config(bert_mlm, data_dir)
  batch = next(data.make_train_iterator(config, spm_tokenizer))
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      'inputs': ((16, 32), np.int32), 'targets': ((16, 32), np.int32),
      'weights': ((16, 32), np.float32), 'token_types': ((16, 32), np.int32)}
  assert (batch['token_types'] == 0).all() and batch['weights'].sum() > 0
  for row in zip(batch['inputs'], batch['targets'], batch['weights']):
    check_mlm_row(*row, config.mlm_max_predictions)
  packed = next(data.make_train_iterator(make_config(bert_mlm, data_dir, packing=True),
                                         spm_tokenizer))
  for row in range(16):
    by_segment = segments(packed['segment_ids'][row], packed['targets'][row])
    for s, targets in by_segment.items():
      in_segment = packed['segment_ids'][row] == s
      assert targets[0] == CLS_ID and targets[-1] == SEP_ID
      check_mlm_row(packed['inputs'][row][in_segment], targets,
                    packed['weights'][row][in_segment], config.mlm_max_predictions)
      np.testing.assert_array_equal(packed['positions'][row][in_segment], np.arange(len(targets)))


def test_masked_lm_statistics_over_10000_sequences(data_dir, spm_tokenizer):
  config = make_config(bert_mlm, data_dir, batch_size=500, mlm_max_predictions=32)
  batches = take(data.make_train_iterator(config, spm_tokenizer), 20)
  inputs, targets, weights = (np.concatenate([b[k] for b in batches])
                              for k in ('inputs', 'targets', 'weights'))
  assert len(inputs) == 10_000
  selected = weights > 0
  assert not selected[targets < NUM_SPECIAL].any()
  rate = selected.sum() / (targets >= NUM_SPECIAL).sum()
  masked = (inputs[selected] == MASK_ID).mean()
  unchanged = (inputs[selected] == targets[selected]).mean()
  randomized = 1 - masked - unchanged
  assert abs(rate - 0.15) < 0.01 and abs(masked - 0.8) < 0.01, (rate, masked)
  assert abs(unchanged - 0.1) < 0.01 and abs(randomized - 0.1) < 0.01, (unchanged, randomized)
  assert (inputs[selected & (inputs != targets) & (inputs != MASK_ID)] >= NUM_SPECIAL).all()
  # The cap binds when it is small.
  capped = next(data.make_train_iterator(make_config(bert_mlm, data_dir, mlm_max_predictions=2),
                                         spm_tokenizer))
  assert capped['weights'].sum(axis=1).max() == 2


def test_prefix_lm_batches(data_dir, spm_tokenizer, encoded_train_pairs):
  config = make_config(unilm_prefix, data_dir)
  batch = next(data.make_train_iterator(config, spm_tokenizer))
  length = config.max_source_len + config.max_target_len + 1
  assert batch['inputs'].shape == batch['token_types'].shape == (16, length)
  assert batch['prefix_len'].shape == (16,) and batch['prefix_len'].dtype == np.int32
  for inputs, targets, weights, types, prefix_len in zip(
      batch['inputs'], batch['targets'], batch['weights'], batch['token_types'],
      batch['prefix_len']):
    end = int(np.count_nonzero(targets))  # seq[1:] has no padding inside.
    source, target = inputs[:prefix_len], targets[prefix_len:end - 1]
    assert (tuple(source), tuple(target)) in encoded_train_pairs
    assert inputs[prefix_len] == BOS_ID and targets[end - 1] == EOS_ID
    np.testing.assert_array_equal(inputs[1:end], targets[:end - 1])
    expected = (np.arange(length) >= prefix_len) & (np.arange(length) < end)
    np.testing.assert_array_equal(weights, expected)
    np.testing.assert_array_equal(types, expected)


# --- Determinism, resumption, epochs, sharding ---------------------------------------------------

VARIANTS = [(original, {}), (original, {'packing': True}), (bert_mlm, {}),
            (bert_mlm, {'packing': True}), (unilm_prefix, {}),
            (gpt_causal, {}), (original, {'packing': True, 'worker_count': 2}),
            (original, {'packing': True, 'subword_split_rate': 0.2})]


def assert_same(batches_a, batches_b):
  for a, b in zip(batches_a, batches_b, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize('module,overrides', VARIANTS,
                         ids=[f'{m.__name__.split(".")[-1]}{"-packed" if o.get("packing") else ""}'
                              f'{"-workers" if o.get("worker_count") else ""}'
                              f'{"-subword_splits" if o.get("subword_split_rate") else ""}'
                              for m, o in VARIANTS])
def test_same_seed_same_batches_and_exact_resume(small_corpus_dir, module, overrides):
  if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags, as under app.run.
    flags.FLAGS.mark_as_parsed()
  config = small_config(module, small_corpus_dir, **overrides)
  tokenizer = data.get_tokenizer(config)
  run = data.make_train_iterator(config, tokenizer)
  uninterrupted = take(run, 4)
  assert_same(take(data.make_train_iterator(config, tokenizer), 4), uninterrupted)

  interrupted = data.make_train_iterator(config, tokenizer)
  take(interrupted, 3)
  state = json.loads(json.dumps(interrupted.get_state()))  # As a checkpoint stores it.
  resumed = data.make_train_iterator(config, tokenizer)
  resumed.set_state(state)
  assert_same([next(resumed)], uninterrupted[3:])

  config.shuffle_buffer_seed = 1
  other = next(data.make_train_iterator(config, tokenizer))
  assert not np.array_equal(other['inputs'], uninterrupted[0]['inputs'])


def test_subword_splits_change_the_training_segmentation_not_the_text(small_corpus_dir):
  plain = small_config(original, small_corpus_dir)
  split = small_config(original, small_corpus_dir, subword_split_rate=0.3)
  tokenizer = data.get_tokenizer(plain)
  batches = [take(data.make_train_iterator(c, tokenizer), 3) for c in (plain, split)]
  for key in ('inputs', 'decoder_inputs'):
    rows = [[tokenizer.decode(row) for b in run for row in b[key]] for run in batches]
    assert rows[0] == rows[1]
    lengths = [sum((b[key] != 0).sum() for b in run) for run in batches]
    assert lengths[1] > 1.1 * lengths[0], lengths
  assert_same(data.make_eval_batches(split, tokenizer), data.make_eval_batches(plain, tokenizer))


@pytest.fixture
def small_corpus(tmp_path):
  """A monolingual corpus of 40 distinct lines."""
  path = tmp_path / 'corpus.txt'
  path.write_text(''.join(f'line {i} says {"la " * (i % 5)}hello\n' for i in range(40)))
  return str(path)


def test_epochs_are_reshuffled_and_remasked(tmp_path, small_corpus):
  config = make_config(bert_mlm, tmp_path / 'prepared', dataset='text',
                       text_train_files=small_corpus, tokenizer='char', batch_size=8)
  tokenizer = data.get_tokenizer(config)
  epoch1, epoch2 = (take(data.make_train_iterator(config, tokenizer), 10)[i:i + 5]
                    for i in (0, 5))

  def rows(batches, key):
    return [tuple(row) for b in batches for row in b[key]]

  assert sorted(rows(epoch1, 'targets')) == sorted(rows(epoch2, 'targets'))  # 40 lines each.
  assert len(set(rows(epoch1, 'targets'))) == 40
  assert rows(epoch1, 'targets') != rows(epoch2, 'targets')
  masks = [dict(zip(rows(epoch, 'targets'), rows(epoch, 'weights'))) for epoch in (epoch1, epoch2)]
  assert sum(masks[0][t] != masks[1][t] for t in masks[0]) > 20  # Fresh masks each epoch.


def test_processes_read_disjoint_shards(tmp_path, small_corpus):
  config = make_config(bert_mlm, tmp_path / 'prepared', dataset='text', tokenizer='char',
                       text_train_files=small_corpus, batch_size=8)
  tokenizer = data.get_tokenizer(config)
  epochs = []
  for process in range(2):  # 40 lines: 20 a process, 5 batches of 4.
    iterator = data.make_train_iterator(config, tokenizer, process_index=process, process_count=2)
    batches = take(iterator, 5)
    assert all(b['inputs'].shape == (4, 32) for b in batches)
    epochs.append([tuple(row) for b in batches for row in b['targets']])
  assert len(set(epochs[0])) == len(set(epochs[1])) == 20
  assert not set(epochs[0]) & set(epochs[1])
  with pytest.raises(ValueError, match='batch_size=8 is not divisible by process_count=3'):
    data.make_train_iterator(config, tokenizer, process_count=3)


# --- Evaluation batches --------------------------------------------------------------------------

def test_eval_batches_cover_the_split_in_order(data_dir, spm_tokenizer):
  config = make_config(original, data_dir)
  pairs = data.load_text_pairs(config, 'validation')
  batches = data.make_eval_batches(config, spm_tokenizer)
  assert len(batches) == -(-len(pairs) // 32)
  assert all(b['inputs'].shape == (32, 24) for b in batches)
  rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  real = rows['weights'].sum(axis=1) > 0
  assert real[:len(pairs)].all() and not real[len(pairs):].any()  # Padding rows at the end only.
  for i in (0, 500, len(pairs) - 1):  # Truncated, not dropped.
    source = spm_tokenizer.encode(pairs[i][0])[:24]
    np.testing.assert_array_equal(rows['inputs'][i][:len(source)], source)
  # Two processes: each gets half of every global batch, which concatenate back in order.
  halves = [data.make_eval_batches(config, spm_tokenizer, process_index=p, process_count=2)
            for p in range(2)]
  assert all(b['inputs'].shape == (16, 24) for half in halves for b in half)
  for whole, first, second in zip(batches, *halves, strict=True):
    for key in whole:
      np.testing.assert_array_equal(whole[key], np.concatenate([first[key], second[key]]))


def test_eval_masks_are_the_same_every_evaluation(data_dir, spm_tokenizer):
  config = make_config(bert_mlm, data_dir)
  first, second = (data.make_eval_batches(config, spm_tokenizer) for _ in range(2))
  assert_same(first, second)
  assert sum(int(b['weights'].sum() > 0) for b in first) == len(first)
