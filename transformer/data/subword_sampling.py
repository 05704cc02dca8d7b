"""Subword regularisation on prepared ids: BPE's merges undone at random while training.

BPE makes every multi-character piece of its vocabulary by merging two older pieces. Splitting a
training token back into those two with probability `rate`, and each half again with the same
probability, shows the model many segmentations of one sentence, as BPE-dropout (Provilkov et al.,
2020) does by skipping merges while it encodes. Done on ids it costs one table lookup per token:
the prepared ids stay as they are, evaluation and decoding see the usual segmentation, and the
splits are drawn from the train iterator's seeded rng, so a resumed run draws the same ones.
"""

from typing import Sequence

import numpy as np

from transformer.special_ids import NUM_SPECIAL

NO_SPLIT = -1  # merge_table entry of a piece that BPE did not make by a merge.


def merge_table(pieces: Sequence[str], scores: Sequence[float]) -> np.ndarray:
  """[V, 2] ids of the two pieces whose merge made each piece, NO_SPLIT for the others.

  pieces and scores are a sentencepiece BPE model's, by id: merges rank by the score of the
  piece they make (higher first; sentencepiece gives merge k the score -k). Encoding a piece's
  characters with those merges ends with the merge that made it; that merge's two halves are its
  entry. Characters, special and user-defined pieces have none.
  """
  ids = {piece: i for i, piece in enumerate(pieces)}
  table = np.full((len(pieces), 2), NO_SPLIT, np.int32)
  for i, piece in enumerate(pieces[NUM_SPECIAL:], NUM_SPECIAL):
    symbols = list(piece)
    if len(symbols) < 2 or not all(s in ids for s in symbols):
      continue
    while len(symbols) > 2:
      ranked = [(scores[ids[a + b]], -j) for j, (a, b) in enumerate(zip(symbols, symbols[1:]))
                if a + b in ids]
      if not ranked:
        break
      j = -max(ranked)[1]  # The best merge; the leftmost of equals, as sentencepiece does.
      symbols[j:j + 2] = [symbols[j] + symbols[j + 1]]
    if len(symbols) == 2 and all(s in ids for s in symbols):
      table[i] = ids[symbols[0]], ids[symbols[1]]
  return table


def split_tokens(ids_N: np.ndarray, table_Vx2: np.ndarray, rate: float,
                 rng: np.random.Generator) -> np.ndarray:
  """ids with each token split into its two halves (table) with probability rate, recursively.

  Only the halves a split made are drawn for again, so a token that stays whole stays whole.
  """
  ids_N = np.asarray(ids_N)
  drawn_N = np.ones(len(ids_N), bool)  # Tokens still to draw for.
  while drawn_N.any():
    halves_Nx2 = table_Vx2[ids_N]
    split_N = drawn_N & (halves_Nx2[:, 0] != NO_SPLIT) & (rng.random(len(ids_N)) < rate)
    if not split_N.any():
      break
    width_N = 1 + split_N
    start_N = np.cumsum(width_N) - width_N  # Where each token's piece(s) start in the output.
    ids_N = np.repeat(ids_N, width_N)
    ids_N[start_N[split_N]] = halves_Nx2[split_N, 0]
    ids_N[start_N[split_N] + 1] = halves_Nx2[split_N, 1]
    drawn_N = np.zeros(len(ids_N), bool)
    drawn_N[start_N[split_N]] = drawn_N[start_N[split_N] + 1] = True
  return ids_N


def split_example(example: tuple[np.ndarray, ...], rng: np.random.Generator, *,
                  table_Vx2: np.ndarray, rate: float, max_lens: Sequence[int]
                  ) -> tuple[np.ndarray, ...]:
  """Each part of a (source, target, ...) example split; a part that would grow past its
  max_lens entry stays as it was, so the batches' shapes hold."""
  out = []
  for part, max_len in zip(example, max_lens, strict=True):
    split = split_tokens(part, table_Vx2, rate, rng)
    out.append(split.astype(part.dtype) if len(split) <= max_len else part)
  return tuple(out)
