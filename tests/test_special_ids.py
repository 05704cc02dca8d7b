"""The special ids are defined once (transformer/special_ids.py), and the tokenizers agree with
them: a trained sentencepiece model holds the special pieces at those ids, and one that does not
is refused when loaded."""

import io

import pytest
import sentencepiece as spm

from transformer import decode, models, special_ids
from transformer.data import tokenizer as tokenizer_lib

TEXTS = ['a man rides a red bike', 'two dogs play in the snow', 'ein Mann fährt Fahrrad'] * 20
# What each special id must decode to in a sentencepiece model, written out.
PIECES = ['<pad>', '<unk>', '<s>', '</s>', '<mask>', '<cls>', '<sep>']


def test_sentencepiece_holds_the_special_pieces_at_the_special_ids(tmp_path):
  tok = tokenizer_lib.SentencePieceTokenizer.train(TEXTS, str(tmp_path / 'spm.model'), 60, 'bpe')
  raw = spm.SentencePieceProcessor(model_file=str(tmp_path / 'spm.model'))
  for name, piece in zip(special_ids.NAMES, PIECES):
    our_id = getattr(special_ids, f'{name.upper()}_ID')
    assert raw.id_to_piece(our_id) == piece, name
    assert getattr(tok, f'{name}_id') == our_id, name
  # The models mask this id and decoding starts, stops and fills with these.
  assert models.PAD_ID == decode.PAD_ID == special_ids.PAD_ID == raw.piece_to_id('<pad>')
  assert (decode.BOS_ID, decode.EOS_ID, decode.MASK_ID) == tuple(
      raw.piece_to_id(p) for p in ('<s>', '</s>', '<mask>'))


def test_a_sentencepiece_model_with_other_special_ids_is_refused(tmp_path):
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXTS), model_writer=model,
                                 vocab_size=30, minloglevel=2)  # sentencepiece's own ids
  (tmp_path / 'other.model').write_bytes(model.getvalue())
  with pytest.raises(ValueError, match='special pieces are not'):
    tokenizer_lib.SentencePieceTokenizer(str(tmp_path / 'other.model'))


def test_character_vocabulary_starts_after_the_special_ids():
  tok = tokenizer_lib.CharTokenizer('ab')
  assert tok.encode('ab') == [special_ids.NUM_SPECIAL, special_ids.NUM_SPECIAL + 1]
  assert tok.decode([special_ids.BOS_ID, special_ids.NUM_SPECIAL, special_ids.EOS_ID,
                     special_ids.NUM_SPECIAL + 1]) == 'a'  # stops at eos, skips specials
