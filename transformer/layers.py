"""Building blocks: embeddings, positional encodings, feed-forward, and the Transformer block.

Shape suffixes: B batch, L length, S source length, D model width, F feed-forward width, V vocab.
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from transformer.attention import MultiHeadAttention, dense

Array = jnp.ndarray


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model's hyperparameters (see configs/common.py for what each one means)."""
  vocab_size: int
  d_model: int = 512
  num_heads: int = 8
  num_layers: int = 6
  num_decoder_layers: int = 6
  d_ff: int = 2048
  activation: str = 'relu'
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.0
  pre_ln: bool = False
  positional: str = 'sinusoidal'
  sinusoidal_layout: str = 'interleaved'
  max_len: int = 256
  share_embeddings: bool = True
  tie_output: bool = True
  num_token_types: int = 0
  attention_bias: bool = False
  scale_embeddings: bool = True
  embedding_norm: bool = False
  layer_norm_epsilon: float = 1e-6
  logits_bias: bool = False
  dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, config, vocab_size: int) -> 'ModelConfig':
    fields = {f.name for f in dataclasses.fields(cls)} - {'vocab_size', 'dtype'}
    return cls(vocab_size=vocab_size, dtype=jnp.dtype(config.dtype),
               **{name: config[name] for name in fields})


def sinusoidal_encoding(positions_BxL: Array, d_model: int, layout: str = 'interleaved') -> Array:
  """PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(...). -> [B, L, D] float32.

  layout 'interleaved' is the paper's (sin, cos, sin, cos, ...); 'halves' puts every sine first
  and every cosine after them (the same features, permuted; Marian and tensor2tensor do this).
  """
  inv_freq_H = np.exp(-np.log(10000.0) * np.arange(0, d_model, 2) / d_model)  # H = D/2
  angles_BxLxH = jnp.einsum('bl,h->blh', positions_BxL.astype(jnp.float32), inv_freq_H)
  if layout not in SINUSOIDAL_LAYOUTS:
    raise ValueError(f'sinusoidal_layout must be one of {", ".join(SINUSOIDAL_LAYOUTS)}, '
                     f'got {layout!r}')
  axis = -1 if layout == 'interleaved' else -2
  encoding = jnp.stack([jnp.sin(angles_BxLxH), jnp.cos(angles_BxLxH)], axis=axis)
  return encoding.reshape(*positions_BxL.shape, d_model)


SINUSOIDAL_LAYOUTS = ('interleaved', 'halves')


class Embedder(nn.Module):
  """Token embedding x sqrt(D) + positional encoding (+ token-type embedding), then dropout.

  scale_embeddings=False drops the x sqrt(D) (BERT, GPT-2); embedding_norm adds a LayerNorm
  before the dropout (BERT).

  `attend` maps hidden states back to vocabulary logits with the same matrix (weight tying).
  """
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    init = nn.initializers.normal(stddev=cfg.d_model ** -0.5)  # Unit variance after the scale.
    self.tokens = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=jnp.float32,
                           embedding_init=nn.with_logical_partitioning(init, ('vocab', 'embed')))
    if cfg.positional == 'learned':
      self.positions = nn.Embed(cfg.max_len, cfg.d_model, dtype=cfg.dtype,
                                param_dtype=jnp.float32,
                                embedding_init=nn.with_logical_partitioning(
                                    nn.initializers.normal(0.02), (None, 'embed')))
    elif cfg.positional != 'sinusoidal':
      raise ValueError(f'positional must be sinusoidal or learned, got {cfg.positional!r}')
    if cfg.num_token_types:
      self.token_types = nn.Embed(cfg.num_token_types, cfg.d_model, dtype=cfg.dtype,
                                  param_dtype=jnp.float32,
                                  embedding_init=nn.with_logical_partitioning(
                                      nn.initializers.normal(0.02), (None, 'embed')))
    if cfg.embedding_norm:
      self.norm = layer_norm('norm', cfg)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def __call__(self, ids_BxL: Array, positions_BxL: Array, token_types_BxL: Optional[Array],
               *, deterministic: bool) -> Array:
    cfg = self.cfg
    x_BxLxD = self.tokens(ids_BxL)
    if cfg.scale_embeddings:
      x_BxLxD = x_BxLxD * jnp.sqrt(jnp.asarray(cfg.d_model, cfg.dtype))
    if cfg.positional == 'learned':
      x_BxLxD = x_BxLxD + self.positions(positions_BxL)
    else:
      x_BxLxD = x_BxLxD + sinusoidal_encoding(positions_BxL, cfg.d_model,
                                              cfg.sinusoidal_layout).astype(cfg.dtype)
    if cfg.num_token_types:
      types_BxL = jnp.zeros_like(ids_BxL) if token_types_BxL is None else token_types_BxL
      x_BxLxD = x_BxLxD + self.token_types(types_BxL)
    if cfg.embedding_norm:
      x_BxLxD = self.norm(x_BxLxD)
    return self.dropout(x_BxLxD, deterministic=deterministic)

  def attend(self, x_BxLxD: Array) -> Array:
    return self.tokens.attend(x_BxLxD)


# config.activation -> function. gelu is the exact erf form; gelu_tanh its tanh approximation
# (GPT-2's "gelu_new", and what jax.nn.gelu computes by default).
ACTIVATIONS = {
    'relu': nn.relu,
    'gelu': lambda x: nn.gelu(x, approximate=False),
    'gelu_tanh': lambda x: nn.gelu(x, approximate=True),
    'silu': nn.silu,
}


def activation_fn(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(f'activation must be one of {", ".join(ACTIVATIONS)}, got {name!r}')
  return ACTIVATIONS[name]


class FeedForward(nn.Module):
  """Position-wise FFN(x) = act(x W1 + b1) W2 + b2."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD: Array) -> Array:
    act = activation_fn(self.cfg.activation)
    h_BxLxF = dense(self.cfg.d_ff, ('embed', 'mlp'), self.cfg.dtype, 'wi')(x_BxLxD)
    return dense(x_BxLxD.shape[-1], ('mlp', 'embed'), self.cfg.dtype, 'wo')(act(h_BxLxF))


def layer_norm(name: str, cfg: ModelConfig) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=cfg.dtype, param_dtype=jnp.float32,
                      name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))


class Block(nn.Module):
  """Self-attention, optional cross-attention (decoder), feed-forward; each as a residual sublayer.

  post-LN (paper): x = LN(x + Dropout(f(x)));  pre-LN: x = x + Dropout(f(LN(x))).
  """
  cfg: ModelConfig
  cross_attention: bool = False

  def _residual(self, x_BxLxD, sublayer, name, deterministic):
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout_rate)
    if cfg.pre_ln:
      return x_BxLxD + drop(sublayer(layer_norm(f'{name}_norm', cfg)(x_BxLxD)),
                            deterministic=deterministic)
    return layer_norm(f'{name}_norm', cfg)(
        x_BxLxD + drop(sublayer(x_BxLxD), deterministic=deterministic))

  @nn.compact
  def __call__(self, x_BxLxD: Array, self_mask: Optional[Array], *,
               encoded_BxSxD: Optional[Array] = None, cross_mask: Optional[Array] = None,
               deterministic: bool = True, decode: bool = False,
               cache_slot: Optional[Array] = None) -> Array:
    cfg = self.cfg

    def attention(name):
      return MultiHeadAttention(cfg.num_heads, cfg.attention_dropout_rate, cfg.dtype,
                                use_bias=cfg.attention_bias, name=name)

    x_BxLxD = self._residual(
        x_BxLxD, lambda h: attention('self_attention')(
            h, h, self_mask, deterministic=deterministic, decode=decode, cache_slot=cache_slot),
        'self_attention', deterministic)
    if self.cross_attention:
      x_BxLxD = self._residual(
          x_BxLxD, lambda h: attention('cross_attention')(
              h, encoded_BxSxD, cross_mask, deterministic=deterministic),
          'cross_attention', deterministic)
    return self._residual(x_BxLxD, FeedForward(cfg, name='ffn'), 'ffn', deterministic)


class Stack(nn.Module):
  """num_layers Blocks, plus the final LayerNorm that pre-LN needs."""
  cfg: ModelConfig
  num_layers: int
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x_BxLxD, self_mask, *, encoded_BxSxD=None, cross_mask=None,
               deterministic=True, decode=False, cache_slot=None):
    for i in range(self.num_layers):
      x_BxLxD = Block(self.cfg, self.cross_attention, name=f'layer_{i}')(
          x_BxLxD, self_mask, encoded_BxSxD=encoded_BxSxD, cross_mask=cross_mask,
          deterministic=deterministic, decode=decode, cache_slot=cache_slot)
    if self.cfg.pre_ln:
      x_BxLxD = layer_norm('final_norm', self.cfg)(x_BxLxD)
    return x_BxLxD
