"""Subword regularisation: tokens split into the halves BPE merged, checked against sentencepiece.

The oracle is sentencepiece's own BPE-dropout: with every merge dropped (alpha=1) it encodes a
sentence into characters, which is what splitting every token with probability 1 must give; and a
merge's two halves must be older pieces (higher score) or characters, by BPE's definition.
"""

import os

import numpy as np
import pytest
import sentencepiece as spm

from tests import run_helpers
from transformer.data import subword_sampling
from transformer.data.tokenizer import SentencePieceTokenizer
from transformer.special_ids import NUM_SPECIAL

SPECIAL = [f'<special{i}>' for i in range(NUM_SPECIAL)]
needs_corpus = run_helpers.needs_corpora('multi30k')


@pytest.fixture(scope='module')
def bpe(tmp_path_factory):
  """A 600-piece BPE vocabulary of multi30k's validation text, and that text."""
  texts = [line.strip() for lang in ('de', 'en')
           for line in open(os.path.join(run_helpers.RAW, 'multi30k', f'val.{lang}'),
                            encoding='utf-8')]
  path = str(tmp_path_factory.mktemp('bpe') / 'bpe.model')
  return SentencePieceTokenizer.train(texts, path, 600, 'bpe'), texts


def test_merge_table_takes_the_highest_ranked_merge_first():
  # 'abc' is 'ab' + 'c' when 'ab' was merged before 'bc', else 'a' + 'bc'.
  pieces = SPECIAL + ['a', 'b', 'c', 'ab', 'bc', 'abc']
  for scores, halves in (([-1, -2], ('ab', 'c')), ([-2, -1], ('a', 'bc'))):
    score = [0.0] * NUM_SPECIAL + [-10, -11, -12] + scores + [-3]
    table = subword_sampling.merge_table(pieces, score)
    assert [pieces[i] for i in table[pieces.index('abc')]] == list(halves)
    assert [pieces[i] for i in table[pieces.index('ab')]] == ['a', 'b']
    assert (table[:NUM_SPECIAL + 3] == subword_sampling.NO_SPLIT).all()  # specials, characters


@needs_corpus
def test_every_merged_piece_splits_into_two_older_pieces(bpe):
  tokenizer, _ = bpe
  pieces, scores = tokenizer.pieces_and_scores()
  table = subword_sampling.merge_table(pieces, scores)
  merged = [i for i in range(NUM_SPECIAL, len(pieces)) if len(pieces[i]) > 1]
  assert merged and all(table[i, 0] != subword_sampling.NO_SPLIT for i in merged)
  for i in merged:
    left, right = table[i]
    assert pieces[left] + pieces[right] == pieces[i]
    assert all(len(pieces[h]) == 1 or scores[h] > scores[i] for h in (left, right))


@needs_corpus
def test_splitting_every_token_gives_sentencepiece_with_every_merge_dropped(bpe):
  tokenizer, texts = bpe
  table = subword_sampling.merge_table(*tokenizer.pieces_and_scores())
  processor = spm.SentencePieceProcessor(model_file=tokenizer.model_path)
  rng = np.random.default_rng(0)
  for text in texts[::10]:
    ids = np.array(processor.encode(text))
    characters = processor.encode(text, enable_sampling=True, alpha=1.0)
    assert subword_sampling.split_tokens(ids, table, 1.0, rng).tolist() == characters
    assert subword_sampling.split_tokens(ids, table, 0.0, rng).tolist() == ids.tolist()
    sampled = subword_sampling.split_tokens(ids, table, 0.3, rng)
    assert processor.decode(sampled.tolist()) == text


def test_each_split_is_drawn_once_at_the_rate():
  # 'abab' = 'ab' + 'ab', 'ab' = 'a' + 'b': at rate r a token of 'abab' becomes 1 piece with
  # probability 1 - r, else two 'ab' that each split with probability r: 1 + r + 2r^2 pieces
  # on average. A token left whole is never drawn for again.
  pieces = SPECIAL + ['a', 'b', 'ab', 'abab']
  table = subword_sampling.merge_table(pieces, [0.0] * NUM_SPECIAL + [-5, -6, -1, -2])
  rng = np.random.default_rng(0)
  n, rate = 20_000, 0.3
  for piece, expected in (('ab', 1 + rate), ('abab', 1 + rate + 2 * rate**2)):
    out = subword_sampling.split_tokens(np.full(n, pieces.index(piece)), table, rate, rng)
    assert abs(len(out) / n - expected) < 0.02, (piece, len(out) / n, expected)


def test_a_part_that_would_grow_too_long_stays_whole():
  pieces = SPECIAL + ['a', 'b', 'ab']
  table = subword_sampling.merge_table(pieces, [0.0] * NUM_SPECIAL + [-5, -6, -1])
  ab = pieces.index('ab')
  source, target = np.full(3, ab, np.int32), np.full(3, ab, np.int32)
  split = subword_sampling.split_example((source, target), np.random.default_rng(0),
                                         table_Vx2=table, rate=0.99, max_lens=(6, 5))
  assert len(split[0]) == 6 and split[0].dtype == np.int32
  np.testing.assert_array_equal(split[1], target)
