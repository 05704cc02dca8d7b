"""Plots: attention maps of both model shapes and the teaching plots are written as real PNGs."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import original, unilm_prefix
from transformer import variants, visualize

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def assert_pngs(paths, min_bytes=5_000):
  for path in paths:
    with open(path, 'rb') as f:
      data = f.read()
    assert data.startswith(PNG_MAGIC) and len(data) > min_bytes, (path, len(data))


@pytest.fixture(scope='module')
def encoder_decoder():
  model = variants.build_model(original.get_config('tiny'), 20)
  src, tgt = jnp.array([[7, 8, 9, 10, 0]]), jnp.array([[2, 11, 12]])
  return model, nn.unbox(model.init(jax.random.key(0), src, tgt)['params']), src, tgt


def test_attention_weights_are_distributions_per_layer(encoder_decoder):
  model, params, src, tgt = encoder_decoder
  weights = visualize.attention_weights(model, params, src, tgt)
  assert set(weights) == {'encoder/self_attention', 'decoder/self_attention',
                          'decoder/cross_attention'}
  assert weights['decoder/cross_attention'].shape == (2, 2, 3, 5)  # layers, heads, Q, K
  np.testing.assert_allclose(weights['encoder/self_attention'].sum(-1), 1.0, rtol=1e-5)
  assert np.all(weights['decoder/cross_attention'][..., 4] < 1e-6)  # the source pad


def test_encoder_decoder_attention_plots(encoder_decoder, tmp_path):
  model, params, src, tgt = encoder_decoder
  paths = visualize.write_attention_plots(
      str(tmp_path), model, params, src, tgt, source_labels=['Ein', 'Hund', 'läuft', '.', '<pad>'],
      target_labels=['<s>', 'A', 'dog'])
  assert len(paths) == 6  # 2 layers x (encoder self, decoder self, cross)
  assert os.path.basename(paths[0]) == 'encoder_self_attention_layer0.png'
  assert_pngs(paths)


def test_single_stack_attention_plots(tmp_path):
  model = variants.build_model(unilm_prefix.get_config('tiny'), 20)
  seq, prefix_len = jnp.array([[7, 8, 9, 2, 11, 12]]), jnp.array([3])
  params = nn.unbox(model.init(jax.random.key(0), seq, prefix_len=prefix_len)['params'])
  paths = visualize.write_attention_plots(str(tmp_path), model, params, seq,
                                          prefix_len=prefix_len)
  assert [os.path.basename(p) for p in paths] == ['stack_self_attention_layer0.png',
                                                  'stack_self_attention_layer1.png']
  assert_pngs(paths)


def test_teaching_plots(tmp_path):
  paths = visualize.write_teaching_plots(str(tmp_path), schedule=lambda s: min(s / 100, 1.0),
                                         num_steps=1000, d_model=64)
  assert [os.path.basename(p) for p in paths] == ['positional_encoding.png', 'masks.png',
                                                  'learning_rate.png']
  assert_pngs(paths, min_bytes=10_000)


def test_example_masks_follow_each_variant():
  panels = {title.split(':')[0]: mask
            for title, (mask, _, _) in visualize.example_masks(8).items()}
  bert, gpt, unilm = (panels['bert_mlm, original encoder'], panels['gpt_causal, original decoder'],
                      panels['unilm_prefix'])
  assert bert[0, 5] and not bert[0, 6]  # sees the future, not pads
  assert gpt[5, 0] and not gpt[0, 5]
  assert unilm[0, 2] and not unilm[0, 3] and unilm[4, 2] and not unilm[3, 4]
  packed = panels['packed row (gpt_causal)']
  assert packed[2, 0] and not packed[3, 2] and packed[6, 3]
