"""Normalisation layers, chosen by config.norm for every norm of a model (and its QK-norm).

  layernorm  (x - mean) / sqrt(var + eps) * scale + bias       (the paper)
  rmsnorm    x / sqrt(mean(x^2) + eps) * scale, no bias        (T5, Llama)
"""

import flax.linen as nn
import jax.numpy as jnp


def make_norm(kind: str, epsilon: float, name: str, axis_name: str | None = 'embed'):
  """A norm over the last axis in float32 (also under mixed precision, precision.py), its
  parameters named `axis_name` for sharding."""
  ones = nn.with_logical_partitioning(nn.initializers.ones, (axis_name,))
  if kind == 'layernorm':
    return nn.LayerNorm(epsilon=epsilon, dtype=jnp.float32, param_dtype=jnp.float32, name=name,
                        scale_init=ones,
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                               (axis_name,)))
  if kind == 'rmsnorm':
    return nn.RMSNorm(epsilon=epsilon, dtype=jnp.float32, param_dtype=jnp.float32, name=name,
                      scale_init=ones)
  raise ValueError(f'norm must be one of {", ".join(KINDS)}, got {kind!r}')


KINDS = ('layernorm', 'rmsnorm')
