"""The variant registry: a variant registered from outside the library trains, evaluates and
decodes through every module, with no other change; abilities gate the modes."""

import json
import os

import pytest

from configs import gpt_causal
from transformer import inference, models, train, variants

TOY = 'toy_bidirectional_lm'


@pytest.fixture
def toy_variant():
  # A model the library does not ship: a bidirectional stack with an LM head, on causal-LM data.
  variants.register(TOY, variants.Variant(models.SingleStack,
                                          dict(mask_kind='bidirectional', head='lm'),
                                          'causal_lm', generates=False))
  yield variants.get(TOY)
  del variants.VARIANTS[TOY]


def toy_config(tmp_path):
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text('the quick brown fox jumps over the lazy dog\n' * 40)
  config = gpt_causal.get_config('tiny')
  config.update(variant=TOY, dataset='text', text_train_files=str(corpus),
                text_eval_files=str(corpus), tokenizer='char', data_dir=str(tmp_path / 'data'),
                num_train_steps=6, log_every_steps=3, eval_every_steps=6,
                checkpoint_every_steps=6, peak_flops=1e11, num_cpu_devices=-1)
  return config


def test_a_registered_variant_trains_and_evaluates(toy_variant, tmp_path):
  config = toy_config(tmp_path)
  workdir = str(tmp_path / 'run')
  state, eval_metrics = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 6 and eval_metrics['eval_loss'] > 0
  assert 'eval_sample' not in eval_metrics  # it does not generate
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    assert [json.loads(line)['step'] for line in f][-1] == 6
  result = inference.run_eval(config, workdir, 'validation')
  assert result['step'] == 6 and 'bleu' not in result


def test_modes_follow_the_registered_abilities(toy_variant, tmp_path):
  config = toy_config(tmp_path)
  with pytest.raises(ValueError, match=r'--mode=generate needs a variant that generates '
                                       r'\(gpt_causal\), not toy_bidirectional_lm'):
    inference.run_generate(config, str(tmp_path / 'run'), 'the', 1)
  with pytest.raises(ValueError, match=r'translates \(original, unilm_prefix\)'):
    inference.run_translate(config, str(tmp_path / 'run'), None, None)


def test_unknown_variant_is_named():
  with pytest.raises(ValueError, match="Unknown variant 'gpt'; expected one of original"):
    variants.get('gpt')
