"""sacrebleu scores: perfect output, casing, signatures."""

import pytest

from transformer import metrics

REFERENCES = ['A man is riding a bicycle down the street.', 'Two dogs play in the snow.']


def test_perfect_hypotheses_score_100():
  scores = metrics.corpus_scores(REFERENCES, REFERENCES)
  assert scores['bleu'] == pytest.approx(100.0)
  assert scores['bleu_lc'] == pytest.approx(100.0)
  assert scores['chrf'] == pytest.approx(100.0)


def test_lowercasing_forgives_case_only():
  hypotheses = [s.upper() for s in REFERENCES]
  scores = metrics.corpus_scores(hypotheses, REFERENCES)
  assert scores['bleu_lc'] == pytest.approx(100.0)
  assert scores['bleu'] < 50.0
  assert scores['chrf'] < 100.0


def test_partial_overlap_scores_between_0_and_100():
  scores = metrics.corpus_scores(['A man is riding a horse down the road.', 'Two cats sleep.'],
                                 REFERENCES)
  assert 0.0 < scores['bleu'] < 100.0 and 0.0 < scores['chrf'] < 100.0


def test_signatures_are_returned():
  scores = metrics.corpus_scores(REFERENCES, REFERENCES)
  assert 'case:mixed' in scores['bleu_signature'] and 'tok:13a' in scores['bleu_signature']
  assert 'case:lc' in scores['bleu_lc_signature']
  assert scores['chrf_signature'].startswith('nrefs:1')


def test_mismatched_lengths_are_refused():
  with pytest.raises(ValueError, match='1 hypotheses but 2 references'):
    metrics.corpus_scores(['x'], REFERENCES)
