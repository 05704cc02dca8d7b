"""Layers against the paper's formulas, written out here in NumPy (not the code's own helpers).

A wrong constant (a missing 1/sqrt(d_k), a missing x sqrt(d_model), a shifted sinusoid) keeps
every shape and most behaviour tests intact; only the numbers catch it.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer.attention import MultiHeadAttention
from transformer.layers import Embedder, ModelConfig


def softmax(x, axis=-1):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def test_attention_matches_numpy_oracle():
  """MultiHead(x, kv) = Concat_h(softmax(Q_h K_h^T / sqrt(d_k) + mask) V_h) W^O, Q_h = x W^Q_h..."""
  b, q, k, d, h = 2, 3, 5, 8, 2
  e = d // h  # d_k
  rng = np.random.default_rng(0)
  x_BxQxD = rng.normal(size=(b, q, d)).astype(np.float32)
  kv_BxKxD = rng.normal(size=(b, k, d)).astype(np.float32)
  mask_BxQxK = rng.random((b, q, k)) < 0.6
  mask_BxQxK[:, :, 0] = True  # no fully masked row
  assert not mask_BxQxK.all()
  layer = MultiHeadAttention(num_heads=h)
  args = (x_BxQxD, kv_BxKxD, jnp.asarray(mask_BxQxK[:, None]))
  params = nn.unbox(layer.init(jax.random.key(0), *args, deterministic=True)['params'])
  out = layer.apply({'params': params}, *args, deterministic=True)

  w = {name: np.asarray(params[name]['kernel'], np.float64)
       for name in ('query', 'key', 'value', 'out')}
  heads = []
  for i in range(h):  # head i: columns i*E..(i+1)*E of W^Q, W^K, W^V
    cols = slice(i * e, (i + 1) * e)
    q_h, k_h, v_h = x_BxQxD @ w['query'][:, cols], kv_BxKxD @ w['key'][:, cols], \
        kv_BxKxD @ w['value'][:, cols]
    scores = q_h @ k_h.transpose(0, 2, 1) / np.sqrt(e) + np.where(mask_BxQxK, 0.0, -np.inf)
    heads.append(softmax(scores) @ v_h)
  expected = np.concatenate(heads, axis=-1) @ w['out']
  np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)


def sinusoid(pos, d):
  """PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))."""
  pe = np.zeros(pos.shape + (d,))
  for i in range(d // 2):
    pe[..., 2 * i] = np.sin(pos / 10000 ** (2 * i / d))
    pe[..., 2 * i + 1] = np.cos(pos / 10000 ** (2 * i / d))
  return pe


def test_embedding_is_scaled_table_plus_position():
  """Embedding(id, pos) = E[id] * sqrt(d_model) + PE(pos) (sinusoidal) or + P[pos] (learned)."""
  vocab, d = 11, 16
  ids_BxL = jnp.array([[3, 7, 1, 10, 0], [5, 5, 2, 9, 4]])
  positions_BxL = jnp.array([[3, 4, 5, 6, 7], [20, 21, 22, 23, 24]])  # offsets, as packed rows
  for positional in ('sinusoidal', 'learned'):
    embedder = Embedder(ModelConfig(vocab_size=vocab, d_model=d, positional=positional,
                                    max_len=32))
    variables = embedder.init(jax.random.key(0), ids_BxL, positions_BxL, None,
                              deterministic=True)
    params = nn.unbox(variables['params'])
    out = embedder.apply({'params': params}, ids_BxL, positions_BxL, None, deterministic=True)
    table = np.asarray(params['tokens']['embedding'], np.float64)
    if positional == 'sinusoidal':
      position_part = sinusoid(np.asarray(positions_BxL, np.float64), d)
    else:
      position_part = np.asarray(params['positions']['embedding'])[np.asarray(positions_BxL)]
    expected = table[np.asarray(ids_BxL)] * np.sqrt(d) + position_part
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5, err_msg=positional)
