"""Incremental decoding with the key/value cache.

Shape suffixes: B batch, S source length, P prompt length, C cache slots, V vocabulary.
"""

import jax
import jax.numpy as jnp


def init_cache(model, batch_size: int, cache_len: int, *, encoded_BxSxD=None, inputs_BxS=None,
               prefix_len_B=None):
  """A zeroed cache of `cache_len` slots for `model` (shapes via eval_shape: no parameters made).

  Encoder-decoder models need the encoder output and source ids; a prefix-LM needs prefix_len.
  """
  tokens_BxC = jnp.ones((batch_size, cache_len), jnp.int32)

  def init_fn():
    if encoded_BxSxD is not None:
      return model.init(jax.random.key(0), encoded_BxSxD, inputs_BxS, tokens_BxC, decode=True,
                        method='decode')
    return model.init(jax.random.key(0), tokens_BxC, prefix_len=prefix_len_B, decode=True)

  shapes = jax.eval_shape(init_fn)['cache']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
