"""Switches for accelerators, each equal to the plain path on CPU: attention_impl and remat.

attention_impl=auto computes attention with jax.nn.dot_product_attention (XLA's kernel on CPU, the
same call that reaches cuDNN's on a GPU); remat recomputes activations in the backward pass. Both
must leave the loss and every gradient as they are, for every variant's masks and the position
schemes that add logit biases.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import bert_mlm, gpt_causal, original, unilm_prefix
from transformer import objectives, variants, visualize
from transformer.layers import REMAT_POLICIES

VOCAB = 50
CONFIGS = {'original': original, 'bert_mlm': bert_mlm, 'gpt_causal': gpt_causal,
           'unilm_prefix': unilm_prefix}
CASES = {  # name: (variant, overrides); every variant's mask, and each kind of logit bias
    'original': ('original', {}),
    'unilm_prefix': ('unilm_prefix', {}),
    'gpt_grouped_query_rotary': ('gpt_causal', dict(num_heads=4, num_kv_heads=2,
                                                    positional='rotary')),
    'gpt_relative_bias': ('gpt_causal', dict(positional='relative_bias')),
    'bert_alibi': ('bert_mlm', dict(positional='alibi')),
    'gpt_local': ('gpt_causal', dict(attention_kind='local', attention_window=4)),
}


def batch_for(variant: str, b: int = 4, length: int = 12) -> dict:
  ids = lambda seed: jax.random.randint(jax.random.key(seed), (b, length), 4, VOCAB)
  # Rows 1 and 3 end in padding, so that the padding masks matter.
  valid_BxL = jnp.arange(length)[None, :] < jnp.array([length, 8, length, 5])[:, None]
  batch = {'inputs': jnp.where(valid_BxL, ids(0), 0), 'targets': ids(1),
           'weights': valid_BxL.astype(jnp.float32)}
  if variant == 'original':
    batch['decoder_inputs'] = ids(2)
  if variant == 'unilm_prefix':
    batch['prefix_len'] = jnp.array([5, 4, 6, 3])
  return batch


def loss_and_grads(variant: str, overrides: dict, **switch):
  """Loss and gradients of one training forward pass (dropout on) at the config's switches."""
  config = CONFIGS[variant].get_config('tiny')
  config.update(dict(overrides, **switch))
  model = variants.build_model(config, VOCAB)
  batch = batch_for(variant)
  params = nn.unbox(objectives.init_params(model, batch, jax.random.key(1)))

  def loss_fn(p):
    logits = objectives.forward(model, p, batch, deterministic=False,
                                rngs={'dropout': jax.random.key(3)})
    loss_sum, metrics = objectives.loss_and_metrics(logits, batch, config.label_smoothing)
    return loss_sum / metrics['weight']

  grad_fn = jax.value_and_grad(loss_fn)
  return jax.jit(grad_fn)(params), jax.make_jaxpr(grad_fn)(params)


def assert_same(plain, switched, tolerance):
  (loss, grads), (loss_switched, grads_switched) = plain, switched
  np.testing.assert_allclose(loss_switched, loss, rtol=tolerance)
  assert jax.tree.structure(grads) == jax.tree.structure(grads_switched)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    g_switched = jax.tree_util.tree_leaves_with_path(grads_switched)
    np.testing.assert_allclose(dict(g_switched)[path], g, rtol=tolerance, atol=tolerance,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('case', list(CASES))
def test_dot_product_attention_equals_the_einsum_path(case, monkeypatch):
  variant, overrides = CASES[case]
  plain, _ = loss_and_grads(variant, overrides, attention_impl='xla')
  calls = []
  fused_kernel = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, 'dot_product_attention',
                      lambda *args, **kwargs: calls.append(1) or fused_kernel(*args, **kwargs))
  fused, _ = loss_and_grads(variant, overrides, attention_impl='auto')
  assert calls  # the switch reached jax.nn.dot_product_attention
  assert_same(plain, fused, 2e-5)


@pytest.mark.parametrize('policy', [p for p in REMAT_POLICIES if p != 'none'])
def test_remat_keeps_loss_and_gradients(policy):
  variant, overrides = CASES['original']  # encoder, decoder and cross-attention blocks
  plain, plain_jaxpr = loss_and_grads(variant, overrides, remat='none')
  rematted, jaxpr = loss_and_grads(variant, overrides, remat=policy)
  assert 'remat' not in str(plain_jaxpr) and 'remat' in str(jaxpr)  # remat is on
  assert_same(plain, rematted, 1e-6)


def test_plots_still_get_attention_weights_from_a_fused_model():
  config = gpt_causal.get_config('tiny')
  config.attention_impl = 'auto'
  model = variants.build_model(config, VOCAB)
  ids_1xL = jnp.arange(4, 12)[None]
  params = nn.unbox(model.init(jax.random.key(1), ids_1xL)['params'])
  weights = visualize.attention_weights(model, params, ids_1xL)['stack/self_attention']
  assert weights.shape == (config.num_layers, config.num_heads, 8, 8)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)


def stacked(params, num_layers: int):
  """Unscanned parameters in scan_layers' layout: each stack's layer_0 .. layer_{n-1} stacked
  into one 'layers' entry along a new leading axis."""
  if not isinstance(params, dict):
    return params
  if 'layer_0' in params:
    layers = [params[f'layer_{i}'] for i in range(num_layers)]
    rest = {k: v for k, v in params.items() if not k.startswith('layer_')}
    return dict(rest, layers=jax.tree.map(lambda *xs: jnp.stack(xs), *layers))
  return {k: stacked(v, num_layers) for k, v in params.items()}


@pytest.mark.parametrize('case, remat', [('original', 'none'), ('gpt_relative_bias', 'none'),
                                         ('original', 'dots')])
def test_scanned_layers_equal_the_unrolled_stack(case, remat):
  variant, overrides = CASES[case]
  config = CONFIGS[variant].get_config('tiny')
  config.update(overrides)
  scanned_config = config.copy_and_resolve_references()
  scanned_config.update(dict(scan_layers=True, remat=remat))
  model, scanned_model = (variants.build_model(c, VOCAB) for c in (config, scanned_config))
  batch = batch_for(variant)
  params = nn.unbox(objectives.init_params(model, batch, jax.random.key(1)))
  scanned_params = stacked(params, config.num_layers)
  abstract = jax.eval_shape(lambda: nn.unbox(objectives.init_params(scanned_model, batch,
                                                                     jax.random.key(1))))
  assert jax.tree.structure(abstract) == jax.tree.structure(scanned_params)

  def loss_fn(m):
    def loss(p):
      logits = objectives.forward(m, p, batch, deterministic=True)
      loss_sum, metrics = objectives.loss_and_metrics(logits, batch, config.label_smoothing)
      return loss_sum / metrics['weight']
    return jax.jit(jax.value_and_grad(loss))

  loss, grads = loss_fn(model)(params)
  assert_same((loss, stacked(grads, config.num_layers)),
              loss_fn(scanned_model)(scanned_params), 1e-5)


def test_scanned_layers_decode_with_their_cache():
  from transformer import decode  # pylint: disable=import-outside-toplevel
  config = gpt_causal.get_config('tiny')
  config.scan_layers = True
  model = variants.build_model(config, VOCAB)
  prompt_BxP = jnp.array([[0, 0, 2, 7, 9], [2, 5, 6, 7, 8]])
  params = nn.unbox(model.init(jax.random.key(1), prompt_BxP)['params'])
  cached, recomputed = (decode.generate(model, params, prompt_BxP, max_len=12, cache=cache)
                        for cache in (True, False))
  np.testing.assert_array_equal(cached, recomputed)
  weights = visualize.attention_weights(model, params, prompt_BxP)['stack/self_attention']
  assert weights.shape == (config.num_layers, config.num_heads, 5, 5)


def test_scanned_layers_beam_search_reorders_the_cache_of_every_layer():
  """Beam search reorders each beam's cache rows; under scan_layers the layers are the cache's
  first axis and the rows its second."""
  from transformer import decode  # pylint: disable=import-outside-toplevel
  config = original.get_config('tiny')
  config.scan_layers = True
  model = variants.build_model(config, VOCAB)
  inputs_BxS = jnp.array([[5, 6, 7, 8, 9], [4, 9, 6, 0, 0]])
  params = nn.unbox(model.init(jax.random.key(3), inputs_BxS, inputs_BxS)['params'])
  (cached, cached_scores), (recomputed, recomputed_scores) = (
      decode.beam_search(model, params, inputs_BxS, max_len=8, beam_size=3, eos_id=-1,
                         cache=cache) for cache in (True, False))
  np.testing.assert_array_equal(cached, recomputed)
  np.testing.assert_allclose(cached_scores, recomputed_scores, rtol=1e-5)
