"""Tokenizers with one set of special ids: sentencepiece (bpe | unigram), characters, or a
Hugging Face `tokenizers` file.

The first two are trained on the train split only (for translation: source and target together,
one joint vocabulary so embeddings can be tied), saved next to the prepared data and reused. The
third comes with a converted model (`launch/convert.py`), its ids relabelled into ours.
"""

import hashlib
import io
import json
import os

from absl import logging
import numpy as np
import sentencepiece as spm

from transformer import errors
from transformer.data import builders
# Re-exported for the pipelines; defined once in transformer/special_ids.py.
from transformer.special_ids import (BOS_ID, CLS_ID, EOS_ID, MASK_ID, NUM_SPECIAL, PAD_ID,
                                     SEP_ID, UNK_ID)

# mask/cls/sep are sentencepiece user-defined symbols (ids 4-6); '\n' (id 7) lets the running
# text of tiny_shakespeare keep its line breaks.
SPM_USER_SYMBOLS = ('<mask>', '<cls>', '<sep>', '\n')
SPM_MAX_SENTENCES = 2_000_000  # Larger corpora are subsampled for training the vocabulary.
TOKENIZERS = ('sentencepiece', 'char', 'huggingface')  # config.tokenizer


class Tokenizer:
  """Text <-> ids. Subclasses implement _encode and _decode."""

  pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID
  mask_id, cls_id, sep_id = MASK_ID, CLS_ID, SEP_ID
  vocab_size: int

  def encode(self, text: str) -> list[int]:
    """Token ids of text, without bos/eos."""
    return self._encode(text)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """encode() of each text (subclasses with a batched encoder override it)."""
    return [self._encode(text) for text in texts]

  def fingerprint(self) -> str:
    """A hash of what maps text to ids: prepared ids are stale when it changes."""
    raise NotImplementedError

  def decode(self, ids) -> str:
    """Text of ids, stopping at the first eos and ignoring special ids (pad, bos, mask, ...)."""
    ids = [int(i) for i in ids]
    if EOS_ID in ids:
      ids = ids[:ids.index(EOS_ID)]
    return self._decode([i for i in ids if i >= NUM_SPECIAL])

  def _encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def _decode(self, ids: list[int]) -> str:
    raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model with identity normalization, so decode(encode(s)) == s for clean text."""

  def __init__(self, model_path: str):
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    self.vocab_size = self._sp.get_piece_size()
    expected = ['<pad>', '<unk>', '<s>', '</s>', *SPM_USER_SYMBOLS[:3]]
    if [self._sp.id_to_piece(i) for i in range(NUM_SPECIAL)] != expected:
      raise ValueError(f'{model_path}: special pieces are not {expected} at ids 0-6.')

  def _encode(self, text):
    return self._sp.encode(text)

  def encode_batch(self, texts):
    return self._sp.encode(texts, num_threads=1)  # Preparation runs one process per core.

  def fingerprint(self):
    return builders.file_sha256(self.model_path)

  def pieces_and_scores(self) -> tuple[list[str], list[float]]:
    """Every piece of the vocabulary and its score, by id (BPE: merge k scores -k)."""
    size = self._sp.get_piece_size()
    return ([self._sp.id_to_piece(i) for i in range(size)],
            [self._sp.get_score(i) for i in range(size)])

  def _decode(self, ids):
    return self._sp.decode(ids)

  @classmethod
  def train(cls, texts: list[str], model_path: str, vocab_size: int, model_type: str):
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        user_defined_symbols=list(SPM_USER_SYMBOLS),
        character_coverage=1.0,  # Every training character gets a piece: no unk on clean text.
        normalization_rule_name='identity',  # No NFKC rewriting, so detokenizing is exact.
        input_sentence_size=SPM_MAX_SENTENCES, shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1, minloglevel=2)
    _write_atomically(model_path, model.getvalue())
    return cls(model_path)


class CharTokenizer(Tokenizer):
  """One id per character of the training text (sorted), after the 7 special ids."""

  def __init__(self, chars: str):
    self.chars = chars
    self._ids = {c: NUM_SPECIAL + i for i, c in enumerate(chars)}
    self.vocab_size = NUM_SPECIAL + len(chars)
    # Code point -> id (unk where not in the vocabulary), for encoding whole batches at once.
    self._table = np.full(max(map(ord, chars), default=0) + 2, UNK_ID, np.int32)
    self._table[[ord(c) for c in chars]] = list(self._ids.values())

  def _encode(self, text):
    return [self._ids.get(c, UNK_ID) for c in text]

  def encode_batch(self, texts):
    if not texts:
      return []
    codes = np.frombuffer(''.join(texts).encode('utf-32-le'), np.uint32)
    ids = self._table[np.minimum(codes, len(self._table) - 1)]  # The last entry is unk.
    return [part.tolist() for part in np.split(ids, np.cumsum([len(t) for t in texts])[:-1])]

  def fingerprint(self):
    return hashlib.sha256(self.chars.encode('utf-8')).hexdigest()

  def _decode(self, ids):
    return ''.join(self.chars[i - NUM_SPECIAL] for i in ids if i < self.vocab_size)

  @classmethod
  def load(cls, path: str):
    with open(path, encoding='utf-8') as f:
      return cls(json.load(f)['chars'])

  @classmethod
  def train(cls, texts: list[str], path: str):
    chars = ''.join(sorted(set(''.join(texts))))
    _write_atomically(path, json.dumps({'chars': chars}, ensure_ascii=False).encode('utf-8'))
    return cls(chars)


class HuggingFaceTokenizer(Tokenizer):
  """A Hugging Face `tokenizers` file (tokenizer.json) whose ids are relabelled into ours.

  The folder also holds vocab_map.json (transformer/interop/vocab.py): special tokens sit at our
  special ids, every other token after them.
  """

  def __init__(self, directory: str):
    import tokenizers  # pylint: disable=import-outside-toplevel  # only converted models need it
    from transformer.interop import vocab  # pylint: disable=import-outside-toplevel
    path = os.path.join(directory, 'tokenizer.json')
    if not os.path.exists(path):
      raise errors.MissingError(f'{path} is missing: config.hf_tokenizer_dir must be the '
                                'hf_tokenizer folder that launch.convert wrote.')
    self._tok = tokenizers.Tokenizer.from_file(path)
    self._fingerprint = ''.join(builders.file_sha256(p) for p in (
        path, os.path.join(directory, 'vocab_map.json')))
    self.vocab_map = vocab.VocabMap.load(os.path.join(directory, 'vocab_map.json'))
    self._hf_to_ours = self.vocab_map.hf_to_ours
    self.vocab_size = self.vocab_map.size

  def _encode(self, text):
    return self._hf_to_ours[self._tok.encode(text, add_special_tokens=False).ids].tolist()

  def encode_batch(self, texts):
    return [self._hf_to_ours[e.ids].tolist()
            for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def fingerprint(self):
    return self._fingerprint

  def _decode(self, ids):
    return self._tok.decode(self.vocab_map.ids_to_hf(ids).tolist(), skip_special_tokens=True)


def _write_atomically(path: str, data: bytes):
  """Readers (other processes) never see a half-written file."""
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)


def tokenizer_path(config, builder) -> str:
  """Where the tokenizer of config lives: next to the prepared data, named by its settings."""
  if config.tokenizer == 'char':
    name = 'char_vocab.json'
  elif config.tokenizer == 'sentencepiece':
    name = f'spm_{config.spm_model_type}_{config.vocab_size}.model'
  else:
    raise errors.ConfigError(f'Unknown tokenizer {config.tokenizer!r}: '
                             f'{" | ".join(TOKENIZERS)}.')
  return os.path.join(os.fspath(builder.data_path), name)


def get_tokenizer(config) -> Tokenizer:
  """The tokenizer of config: prepares the data if needed, trains on the train split once."""
  if config.tokenizer == 'huggingface':
    return HuggingFaceTokenizer(config.hf_tokenizer_dir)
  path = tokenizer_path(config, builders.prepare(config))
  if not os.path.exists(path):
    # Every text field of the train split: both languages of a translation corpus (one joint
    # vocabulary, the same for either direction and for every variant).
    texts = [text for example in builders.sample_split(config, 'train', SPM_MAX_SENTENCES)
             for text in example.values()]
    logging.info('Training the %s tokenizer on %d train texts -> %s', config.tokenizer, len(texts),
                 path)
    if config.tokenizer == 'char':
      return CharTokenizer.train(texts, path)
    return SentencePieceTokenizer.train(texts, path, config.vocab_size, config.spm_model_type)
  if config.tokenizer == 'char':
    return CharTokenizer.load(path)
  return SentencePieceTokenizer(path)
