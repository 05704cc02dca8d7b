"""The modes that use a trained model: eval, translate, generate, fill_mask, visualize."""

import json
import os

import jax
import numpy as np
import pytest

from configs import bert_mlm, gpt_causal
from tests import run_helpers
from transformer import inference, train

pytestmark = run_helpers.needs_corpus


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(config, workdir) of original:tiny trained for 2 steps, with checkpoints of steps 1 and 2."""
  config = run_helpers.make_config(run_helpers.prepared_data_dir(), num_train_steps=2,
                                   checkpoint_every_steps=1, decode_max_len=8, beam_size=2)
  workdir = str(tmp_path_factory.mktemp('trained'))
  train.train_and_evaluate(config, workdir)
  return config, workdir


def test_translate_keeps_one_line_per_input_line(trained, tmp_path, caplog):
  config, workdir = trained
  long_line = ' '.join(['Hund'] * (4 * config.max_source_len))
  lines = ['Ein Hund läuft.', '', long_line, '   ', 'Zwei Männer.']
  source, output = tmp_path / 'in.txt', tmp_path / 'out.txt'
  source.write_text('\n'.join(lines) + '\n', encoding='utf-8')
  inference.run_translate(config, workdir, str(source), str(output))
  out_lines = output.read_text(encoding='utf-8').split('\n')[:-1]
  assert len(out_lines) == len(lines)
  assert out_lines[1] == '' and out_lines[3] == ''  # empty (or blank) in, empty out
  assert 'truncated' in caplog.text and 'max_source_len' in caplog.text


def test_eval_writes_json_with_bleu_and_signature(trained):
  config, workdir = trained
  result = inference.run_eval(config, workdir, 'validation')
  name = f'eval_validation_step2_beam{config.beam_size}_lp{config.length_penalty:g}.json'
  with open(os.path.join(workdir, name), encoding='utf-8') as f:
    assert json.load(f) == result
  assert result['step'] == 2 and result['ppl'] > 1
  assert result['bleu_signature'].startswith('nrefs:1|case:mixed')
  assert 'case:lc' in result['bleu_lc_signature'] and 'chrf' in result


def test_visualize_writes_teaching_and_attention_plots(trained):
  config, workdir = trained
  paths = inference.run_visualize(config, workdir, 'Ein Hund läuft.')
  names = {os.path.basename(p) for p in paths}
  assert {'masks.png', 'positional_encoding.png', 'learning_rate.png',
          'decoder_cross_attention_layer0.png'} <= names
  assert all(os.path.getsize(p) > 5000 for p in paths)


def test_modes_refuse_the_wrong_variant(trained):
  config, workdir = trained
  with pytest.raises(ValueError, match=r'generate needs a variant that generates \(gpt_causal\)'):
    inference.run_generate(config, workdir, 'A', 1)
  with pytest.raises(ValueError, match=r'fills masks \(bert_mlm\)'):
    inference.run_fill_mask(config, workdir, 'A <mask>.')


def test_checkpoint_by_step(trained):
  config, workdir = trained
  assert inference.restore(config, workdir, '1')[2] == [1]
  assert inference.restore(config, workdir, 'latest')[2] == [2]
  with pytest.raises(ValueError, match='No checkpoint of step 7 .* holds steps 1, 2'):
    inference.restore(config, workdir, '1,7')


def test_averaged_checkpoints_are_the_mean_of_their_parameters(trained):
  config, workdir = trained
  _, params_1, _ = inference.restore(config, workdir, '1')
  _, params_2, _ = inference.restore(config, workdir, '2')
  _, averaged, steps = inference.restore(config, workdir, '1,2')
  assert steps == [1, 2]
  differs = jax.tree.map(lambda a, b: bool(np.any(a != b)), params_1, params_2)
  assert any(jax.tree.leaves(differs))  # Otherwise the mean could not be told from either one.
  jax.tree.map(lambda a, b, m: np.testing.assert_allclose(m, (a + b) / 2, rtol=1e-6, atol=1e-7),
               params_1, params_2, averaged)
  result = inference.run_eval(config, workdir, 'validation', '1,2')
  assert result['averaged_steps'] == [1, 2] and os.path.exists(os.path.join(
      workdir, f'eval_validation_avg1-2_beam{config.beam_size}_lp{config.length_penalty:g}.json'))


def test_missing_checkpoint_says_where_it_looked(tmp_path):
  config = run_helpers.make_config(run_helpers.prepared_data_dir())
  with pytest.raises(FileNotFoundError, match='No checkpoint in .*checkpoints: train first'):
    inference.run_eval(config, str(tmp_path / 'empty'), 'validation')


@pytest.mark.parametrize('module', [gpt_causal, bert_mlm], ids=['generate', 'fill_mask'])
def test_language_model_modes(module, tmp_path, capsys):
  config = module.get_config('tiny')
  overrides = run_helpers.overrides(run_helpers.prepared_data_dir(), num_train_steps=1,
                                    decode_max_len=10)
  config.update({k: v for k, v in overrides.items() if k in config})
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  if module is gpt_causal:
    samples = inference.run_generate(config, workdir, 'Ein', 2)
    assert len(samples) == 2 and all(s.startswith('Ein') for s in samples)
  else:
    lines = inference.run_fill_mask(config, workdir, 'Ein <mask> läuft <mask>.', top_k=3)
    assert len(lines) == 2 and all(line.count("'") >= 6 for line in lines)
  assert capsys.readouterr().out
