"""The masks built for real batches agree with how the pipelines construct the examples."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from configs import original, unilm_prefix
from tests import run_helpers
from transformer import data, masks, objectives, variants

pytestmark = run_helpers.needs_corpus


def real_batch(module, **overrides):
  config = module.get_config('tiny')
  config.update(run_helpers.overrides(run_helpers.prepared_data_dir(), **overrides))
  tokenizer = data.get_tokenizer(config)
  return config, tokenizer, next(data.make_train_iterator(config, tokenizer))


def test_prefix_lm_source_never_sees_its_target():
  _, tokenizer, batch = real_batch(unilm_prefix)
  inputs, prefix_len = batch['inputs'], batch['prefix_len']
  mask = np.asarray(masks.self_attention_mask('prefix', jnp.asarray(inputs != 0),
                                              prefix_len_B=jnp.asarray(prefix_len)))
  mask = np.broadcast_to(mask, (len(inputs), 1, inputs.shape[1], inputs.shape[1]))
  for row in range(len(inputs)):
    p = prefix_len[row]
    assert inputs[row, p] == tokenizer.bos_id  # the target part starts at prefix_len
    assert not mask[row, 0, :p, p:].any()  # no source query sees a target key
    assert mask[row, 0, :p, :p].all()  # the source is bidirectional
    assert (batch['weights'][row, :p] == 0).all()  # and carries no loss
    real = inputs[row] != 0
    assert (mask[row, 0][:, ~real] == 0).all()  # nobody attends to padding


def test_packed_rows_never_attend_across_examples():
  config, _, batch = real_batch(original, packing=True, max_source_len=60, max_target_len=60)
  dec_seg, enc_seg = batch['decoder_segment_ids'], batch['inputs_segment_ids']
  assert dec_seg.max() > 1  # rows really hold several examples
  self_mask = np.asarray(masks.self_attention_mask('causal', jnp.asarray(dec_seg > 0),
                                                   segment_ids_BxL=jnp.asarray(dec_seg)))
  cross = np.asarray(masks.cross_attention_mask(jnp.asarray(enc_seg > 0), jnp.asarray(dec_seg),
                                                jnp.asarray(enc_seg)))
  different = dec_seg[:, None, :, None] != dec_seg[:, None, None, :]
  assert not (self_mask & different).any()
  assert not (cross & (dec_seg[:, None, :, None] != enc_seg[:, None, None, :])).any()


def alone_in_a_row(x: np.ndarray, length: int) -> jnp.ndarray:
  """One example as the only one of a row of `length`, padded with 0 as unpacked batches are
  (one shape for every example, so the model compiles once)."""
  row = np.zeros((1, length), x.dtype)
  row[0, :len(x)] = x
  return jnp.asarray(row)


def test_packed_row_gives_the_logits_of_its_examples_alone():
  config, tokenizer, batch = real_batch(original, packing=True, max_source_len=60, max_target_len=60)
  model = variants.build_model(config, tokenizer.vocab_size)
  params = nn.unbox(objectives.init_params(model, batch, jax.random.key(0)))
  packed = np.asarray(jax.jit(lambda b: objectives.forward(model, params, b))(batch))[0]
  row = {k: v[0] for k, v in batch.items()}
  apply = jax.jit(lambda src, tgt: model.apply({'params': params}, src, tgt))
  for segment in range(1, int(row['decoder_segment_ids'].max()) + 1):
    src = row['inputs'][row['inputs_segment_ids'] == segment]
    tgt_in = row['decoder_inputs'][row['decoder_segment_ids'] == segment]
    alone = apply(alone_in_a_row(src, len(row['inputs'])),
                  alone_in_a_row(tgt_in, len(row['decoder_inputs'])))
    np.testing.assert_allclose(packed[row['decoder_segment_ids'] == segment],
                               alone[0, :len(tgt_in)], atol=2e-5, rtol=2e-5)


def test_packed_prefix_lm_row_gives_the_logits_of_its_examples_alone():
  """Each packed example's source sees its own source and never its target or another example."""
  config, tokenizer, batch = real_batch(unilm_prefix, packing=True, max_source_len=60,
                                        max_target_len=60)
  assert 'prefix_len' not in batch and batch['segment_ids'].max() > 1
  model = variants.build_model(config, tokenizer.vocab_size)
  params = nn.unbox(objectives.init_params(model, batch, jax.random.key(0)))
  packed = np.asarray(jax.jit(lambda b: objectives.forward(model, params, b))(batch))[0]
  row = {k: v[0] for k, v in batch.items()}
  apply = jax.jit(lambda ids, prefix_len, types: model.apply(
      {'params': params}, ids, prefix_len=prefix_len, token_types=types))
  for segment in range(1, int(row['segment_ids'].max()) + 1):
    in_segment = row['segment_ids'] == segment
    ids, types = row['inputs'][in_segment], row['token_types'][in_segment]
    alone = apply(alone_in_a_row(ids, len(row['inputs'])),
                  jnp.asarray([int((types == 0).sum())]),
                  alone_in_a_row(types, len(row['inputs'])))
    np.testing.assert_allclose(packed[in_segment], alone[0, :len(ids)], atol=2e-5, rtol=2e-5)
