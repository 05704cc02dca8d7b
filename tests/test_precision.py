"""Mixed precision (transformer/precision.py): bfloat16 product inputs, float32 sums, forward and
backward, against the definition written out in NumPy; dtype=auto's rule."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from configs import gpt_causal, original
from transformer import config_checks, decode, errors, precision, variants

VOCAB = 50


def rounded(x):
  """x rounded to bfloat16 (round to nearest even), in float64."""
  return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


# A dense layer's product, then attention's four batched products (scores and their sum of
# values, with grouped-query heads too): the keys' and values' gradients of the first two sum over
# the query axis, last in neither operand (precision._narrow_product moves it on the CPU backend).
PRODUCTS = {'bln,nf->blf': ((3, 5, 64), (64, 7)),
            'bqhe,bkhe->bhqk': ((2, 5, 3, 8), (2, 6, 3, 8)),
            'bhqk,bkhe->bqhe': ((2, 3, 5, 6), (2, 6, 3, 8)),
            'bqgre,bkge->bgrqk': ((2, 5, 1, 3, 8), (2, 6, 1, 8)),
            'bgrqk,bkge->bqgre': ((2, 1, 3, 5, 6), (2, 6, 1, 8))}


@pytest.mark.parametrize('spec', PRODUCTS)
def test_bfloat16_product_and_its_gradients_are_rounded_inputs_summed_in_float32(spec):
  (a_spec, b_spec), out_spec = spec.split('->')[0].split(','), spec.split('->')[1]
  a = jax.random.normal(jax.random.key(0), PRODUCTS[spec][0])
  b = jax.random.normal(jax.random.key(1), PRODUCTS[spec][1])
  g = jax.random.normal(jax.random.key(2), np.einsum(spec, np.zeros(a.shape),  # the cotangent
                                                     np.zeros(b.shape)).shape)

  def forward_backward(a, b, g):
    out, vjp = jax.vjp(lambda a, b: precision.einsum(spec, a, b, jnp.bfloat16), a, b)
    return (out, *vjp(g))

  out, da, db = jax.jit(forward_backward)(a, b, g)
  assert out.dtype == da.dtype == db.dtype == jnp.float32
  # The definition: each product's two inputs rounded to bfloat16, the sums exact (float32's
  # rounding is far below the tolerance); in the backward pass the cotangent is such an input.
  np.testing.assert_allclose(out, np.einsum(spec, rounded(a), rounded(b)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(da, np.einsum(f'{out_spec},{b_spec}->{a_spec}', rounded(g),
                                           rounded(b)), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(db, np.einsum(f'{a_spec},{out_spec}->{b_spec}', rounded(a),
                                           rounded(g)), rtol=1e-5, atol=1e-5)
  # And not float32's products.
  assert not np.allclose(out, np.einsum(spec, np.float64(a), np.float64(b)), rtol=1e-5,
                         atol=1e-5)


def products(hlo_text):
  """(operand dtypes, result dtype) of every dot_general in a StableHLO module."""
  found = re.findall(r'stablehlo\.dot_general .*?: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)'
                     r' -> tensor<[^>]*x(\w+)>', hlo_text)
  return [((lhs, rhs), out) for lhs, rhs, out in found]


def test_every_product_of_a_bfloat16_train_step_has_bfloat16_inputs_and_float32_sums():
  config = gpt_causal.get_config('tiny')
  config.dtype = 'bfloat16'
  model = variants.build_model(config, VOCAB)
  x = jax.random.randint(jax.random.key(0), (2, 8), 4, VOCAB)
  params = nn.unbox(model.init(jax.random.key(1), x)['params'])
  grad = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x) ** 2)))
  found = products(grad.lower(params).as_text())
  # One product per dense kernel, and the output layer's product with the tied embedding; each
  # appears three times, in the forward pass and in the two backward products.
  kernels = [p for path, p in jax.tree_util.tree_leaves_with_path(params)
             if path[-1].key == 'kernel']
  assert config.tie_output  # the output product with the embedding table
  # Attention's two batched products per layer too, on every backend.
  attention = 3 * 2 * config.num_layers
  assert sum(ops == ('bf16', 'bf16') for ops, _ in found) == 3 * (len(kernels) + 1) + attention
  assert len(found) == 3 * (len(kernels) + 1) + attention
  assert all(out == 'f32' for _, out in found)


# Attention as each kind computes it (its blocks, parts or projections), grouped-query heads, a
# per-head bias, and an encoder-decoder's cross-attention.
KINDS = {'full': dict(), 'grouped_query': dict(num_heads=4, num_kv_heads=2),
         'local': dict(attention_kind='local', attention_window=4),
         'strided': dict(attention_kind='strided', attention_window=4),
         'low_rank': dict(attention_kind='low_rank', low_rank_dim=8),
         'relative_bias': dict(positional='relative_bias'), 'fused': dict(attention_impl='auto')}


@pytest.mark.parametrize('variant, kind', [('gpt_causal', k) for k in KINDS] +
                         [('original', 'full')])
def test_bfloat16_gradients_run_and_stay_near_float32s_for_every_attention(variant, kind):
  config = {'gpt_causal': gpt_causal, 'original': original}[variant].get_config('tiny')
  config.update(KINDS[kind])
  x = jax.random.randint(jax.random.key(0), (2, 16), 4, VOCAB)
  inputs = (x,) if variant == 'gpt_causal' else (x, x)
  grads = {}
  for dtype in ('float32', 'bfloat16'):
    config.dtype = dtype
    model = variants.build_model(config, VOCAB)
    params = nn.unbox(model.init(jax.random.key(1), *inputs)['params'])  # the same for both
    grads[dtype] = jax.jit(jax.grad(
        lambda p: jnp.mean(model.apply({'params': p}, *inputs) ** 2)))(params)
  for f32, bf16 in zip(jax.tree.leaves(grads['float32']), jax.tree.leaves(grads['bfloat16'])):
    assert np.linalg.norm(bf16 - f32) <= 0.05 * np.linalg.norm(f32)  # bfloat16's rounding
    assert np.any(bf16 != f32)  # it really computed in bfloat16


@pytest.mark.parametrize('kind', [k for k in KINDS if k != 'low_rank'])  # low_rank: no cache
def test_bfloat16_cached_decoding_runs_and_stays_near_float32s_for_every_attention(kind):
  """Decoding through the key/value cache runs in bfloat16 on the CPU for every attention with a
  cache (XLA:CPU once failed on grouped-query attention's sum of the values over the cache), and
  each step's logits, the same tokens fed to both, stay near float32's."""
  config = gpt_causal.get_config('tiny')
  config.update(KINDS[kind])
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 4, VOCAB)
  logits = {}
  for dtype in ('float32', 'bfloat16'):
    config.dtype = dtype
    model = variants.build_model(config, VOCAB)
    params = nn.unbox(model.init(jax.random.key(1), tokens)['params'])  # the same for both

    @jax.jit
    def steps(params):
      decoder = decode._single_stack(model, params, tokens[:, :4], max_len=8, copies=1,
                                     use_cache=True)
      state, logits_BxV = decoder.state, []
      for t in range(4, 12):
        step_logits_BxV, state = decoder.step(state, tokens[:, t:t + 1])
        logits_BxV.append(step_logits_BxV)
      return jnp.stack(logits_BxV, axis=1)

    logits[dtype] = steps(params)
  np.testing.assert_allclose(logits['bfloat16'], logits['float32'], atol=0.1, rtol=0.1)
  assert not np.allclose(logits['bfloat16'], logits['float32'], atol=1e-6)  # really bfloat16


def test_bfloat16_model_keeps_float32_parameters_and_logits_near_float32s():
  x = jax.random.randint(jax.random.key(0), (2, 8), 4, VOCAB)
  config = gpt_causal.get_config('tiny')
  f32 = variants.build_model(config, VOCAB)
  config.dtype = 'bfloat16'
  bf16 = variants.build_model(config, VOCAB)
  params = nn.unbox(bf16.init(jax.random.key(1), x)['params'])
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  logits_bf16 = jax.jit(bf16.apply)({'params': params}, x)
  logits_f32 = jax.jit(f32.apply)({'params': params}, x)
  assert logits_bf16.dtype == jnp.float32
  np.testing.assert_allclose(logits_bf16, logits_f32, atol=0.1, rtol=0.1)
  assert not np.allclose(logits_bf16, logits_f32, atol=1e-6)  # it really computed in bf16


@pytest.mark.parametrize('bf16_speedup, chosen', [(3.9, jnp.bfloat16), (1.5, jnp.bfloat16),
                                                   (1.4, jnp.float32), (0.6, jnp.float32)])
def test_auto_takes_bfloat16_where_its_matmuls_are_enough_faster(monkeypatch, bf16_speedup,
                                                                   chosen):
  peaks = {jnp.dtype(jnp.float32): 100e9, jnp.dtype(jnp.bfloat16): bf16_speedup * 100e9}
  monkeypatch.setattr(precision, '_matmul_flops_per_s',
                      lambda devices, size, dtype, repeats: peaks[jnp.dtype(dtype)])
  precision.compute_dtype.cache_clear()
  try:
    assert precision.compute_dtype('auto') == chosen
    assert precision.compute_dtype('float32') == jnp.float32  # named dtypes are taken as named
    assert precision.compute_dtype('bfloat16') == jnp.bfloat16
  finally:
    precision.compute_dtype.cache_clear()


def test_auto_is_not_fooled_by_a_cold_first_measurement(monkeypatch):
  # The first products a process runs are slow, whichever dtype they are in: here the first
  # measurement comes out at a quarter of its steady value, on a machine where bfloat16 runs
  # 2x float32. One measurement of each dtype would read that as 0.5x (or 8x) and choose by it.
  steady = {jnp.dtype(jnp.float32): 100e9, jnp.dtype(jnp.bfloat16): 200e9}
  calls = []

  def measured(devices, size, dtype, repeats):
    calls.append(jnp.dtype(dtype))
    return steady[jnp.dtype(dtype)] / (4 if len(calls) == 1 else 1)

  monkeypatch.setattr(precision, '_matmul_flops_per_s', measured)
  precision.compute_dtype.cache_clear()
  try:
    assert precision.compute_dtype('auto') == jnp.bfloat16
  finally:
    precision.compute_dtype.cache_clear()
  assert set(calls) == set(steady)


def test_an_unknown_dtype_is_refused_naming_the_field():
  config = gpt_causal.get_config('tiny')
  config.dtype = 'float16'
  with pytest.raises(errors.UserError, match=r'config\.dtype=.float16. is not one of auto, '
                                             r'float32, bfloat16'):
    config_checks.check(config)
