"""Translation quality with sacrebleu: BLEU (cased and lowercased) and chrF.

Scores compare detokenized hypotheses (tokenizer.decode of the model output) with the raw reference
sentences, so that they are comparable across tokenizers and with published numbers. Report the
signature strings with the scores: they pin down the tokenization, casing and smoothing used.
"""

from collections.abc import Sequence

from sacrebleu.metrics import BLEU, CHRF


def corpus_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
  """Corpus BLEU, lowercased BLEU and chrF of hypotheses against one reference per sentence.

  Returns dict(bleu, bleu_lc, chrf) as floats in [0, 100], and each metric's signature string as
  bleu_signature, bleu_lc_signature and chrf_signature.
  """
  if len(hypotheses) != len(references):
    raise ValueError(f'{len(hypotheses)} hypotheses but {len(references)} references.')
  metrics = {'bleu': BLEU(), 'bleu_lc': BLEU(lowercase=True), 'chrf': CHRF()}
  scores = {}
  for name, metric in metrics.items():
    scores[name] = metric.corpus_score(list(hypotheses), [list(references)]).score
    scores[f'{name}_signature'] = str(metric.get_signature())
  return scores
