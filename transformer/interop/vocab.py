"""Relabelling a Hugging Face vocabulary into this project's id convention, and back.

The project's models and pipelines reserve the first ids for special tokens: 0 pad (never
attended to), 1 unk, 2 bos, 3 eos, 4 mask, 5 cls, 6 sep (`transformer.data.tokenizer`). A Hugging
Face model numbers its vocabulary its own way (GPT-2 has no pad and one token for bos and eos;
Marian starts decoding with its pad token and has eos at 0; BERT has no bos or eos). A converted
model is the same function up to a relabelling of the vocabulary:

  our_to_hf[i]   the Hugging Face id whose embedding row our id i holds (-1: no such token, a
                 zero row);
  canonical[i]   whether our id i is where that Hugging Face token's logit lives. Each Hugging Face
                 id is canonical at exactly one of our ids; every other id (a missing special, or
                 a second name for a token, such as GPT-2's bos beside its eos) gets a logit bias
                 of -1e9, so that its probability is exactly 0 and log-softmax over our vocabulary
                 equals the reference's.
"""

import dataclasses
import json
import os

import numpy as np

from transformer.special_ids import NAMES as SPECIALS  # our special ids, in id order

# Which name keeps a token's logit when two specials share one Hugging Face token: eos before bos
# (GPT-2's <|endoftext|> must be predicted as eos, so that decoding stops), pad before bos
# (Marian's decoder starts from its pad token).
CANONICAL_PRIORITY = ('pad', 'eos', 'unk', 'mask', 'cls', 'sep', 'bos')
NEVER_LOGIT = -1e9  # exp(-1e9 - max) is exactly 0 in float32.


@dataclasses.dataclass(frozen=True)
class VocabMap:
  our_to_hf: np.ndarray  # [V_ours] int, -1 where no Hugging Face token
  canonical: np.ndarray  # [V_ours] bool

  @property
  def size(self) -> int:
    return len(self.our_to_hf)

  @property
  def hf_size(self) -> int:
    return int(self.our_to_hf[self.canonical].max()) + 1

  @property
  def hf_to_ours(self) -> np.ndarray:
    """[V_hf] our canonical id of each Hugging Face id."""
    out = np.full(self.hf_size, -1, np.int64)
    out[self.our_to_hf[self.canonical]] = np.flatnonzero(self.canonical)
    return out

  @property
  def is_identity(self) -> bool:
    return bool(self.canonical.all() and (self.our_to_hf == np.arange(self.size)).all())

  @classmethod
  def build(cls, hf_vocab_size: int, specials: dict) -> 'VocabMap':
    """From the Hugging Face ids of our special tokens (name -> id or None)."""
    our_to_hf = np.full(len(SPECIALS), -1, np.int64)
    canonical = np.zeros(len(SPECIALS), bool)
    taken = set()
    for name in CANONICAL_PRIORITY:
      hf_id = specials.get(name)
      if hf_id is None:
        continue
      if not 0 <= hf_id < hf_vocab_size:
        raise ValueError(f'{name} token id {hf_id} is outside the vocabulary (size '
                         f'{hf_vocab_size}).')
      slot = SPECIALS.index(name)
      our_to_hf[slot] = hf_id
      canonical[slot] = hf_id not in taken
      taken.add(hf_id)
    rest = np.array([i for i in range(hf_vocab_size) if i not in taken], np.int64)
    return cls(np.concatenate([our_to_hf, rest]),
               np.concatenate([canonical, np.ones(len(rest), bool)]))

  @classmethod
  def identity(cls, size: int) -> 'VocabMap':
    return cls(np.arange(size), np.ones(size, bool))

  # --- Moving arrays between the two labellings -------------------------------------------------

  def rows_from_hf(self, table_VxD: np.ndarray) -> np.ndarray:
    """Embedding rows in our order; ids without a Hugging Face token get zeros."""
    rows = table_VxD[np.maximum(self.our_to_hf, 0)]
    return np.where((self.our_to_hf >= 0)[:, None], rows, 0).astype(table_VxD.dtype)

  def bias_from_hf(self, bias_V: np.ndarray | None) -> np.ndarray:
    """A logit bias in our order: the reference's on canonical ids, NEVER_LOGIT elsewhere."""
    if bias_V is None:
      bias_V = np.zeros(self.hf_size, np.float32)
    return np.where(self.canonical, bias_V[np.maximum(self.our_to_hf, 0)],
                    NEVER_LOGIT).astype(np.float32)

  def rows_to_hf(self, table_VxD: np.ndarray) -> np.ndarray:
    return table_VxD[self.hf_to_ours]

  def bias_to_hf(self, bias_V: np.ndarray) -> np.ndarray:
    return bias_V[self.hf_to_ours]

  def needs_logits_bias(self) -> bool:
    """Whether some id must never be predicted (it needs a bias of NEVER_LOGIT)."""
    return not self.canonical.all()

  def ids_from_hf(self, hf_ids) -> np.ndarray:
    return self.hf_to_ours[np.asarray(hf_ids)]

  def ids_to_hf(self, our_ids) -> np.ndarray:
    return self.our_to_hf[np.asarray(our_ids)]

  # --- Files --------------------------------------------------------------------------------------

  def save(self, path: str):
    with open(path, 'w', encoding='utf-8') as f:
      json.dump({'our_to_hf': self.our_to_hf.tolist(), 'canonical': self.canonical.tolist()}, f)

  @classmethod
  def load(cls, path: str) -> 'VocabMap':
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} is missing: the vocabulary map of a converted model.')
    with open(path, encoding='utf-8') as f:
      d = json.load(f)
    return cls(np.asarray(d['our_to_hf'], np.int64), np.asarray(d['canonical'], bool))
