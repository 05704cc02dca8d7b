"""Building blocks: embeddings, feed-forward, and the Transformer block and stack.

Shape suffixes: B batch, L length, S source length, D model width, F feed-forward width, V vocab,
H heads.
"""

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer import attention_kinds, norms, positions, precision
from transformer.attention import MultiHeadAttention, dense

Array = jnp.ndarray


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The model's hyperparameters (see configs/common.py for what each one means)."""
  vocab_size: int
  d_model: int = 512
  num_heads: int = 8
  num_kv_heads: Optional[int] = None
  num_layers: int = 6
  num_decoder_layers: int = 6
  d_ff: int = 2048
  ffn: str = 'dense'
  ffn_bias: bool = True
  activation: str = 'relu'
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.0
  pre_ln: bool = False
  norm: str = 'layernorm'
  norm_epsilon: float = 1e-6
  qk_norm: bool = False
  positional: str = 'sinusoidal'
  sinusoidal_layout: str = 'interleaved'
  rope_theta: float = 10000.0
  relative_buckets: int = 32
  relative_max_distance: int = 128
  max_len: int = 256
  share_embeddings: bool = True
  tie_output: bool = True
  num_token_types: int = 0
  attention_bias: bool = False
  scale_attention: bool = True
  scale_embeddings: bool = True
  embedding_norm: bool = False
  embedding_dim: Optional[int] = None
  share_layers: bool = False
  attention_kind: str = 'full'
  attention_window: int = 128
  num_global_tokens: int = 0
  low_rank_dim: int = 64
  lsh_buckets: int = 8
  lsh_rounds: int = 2
  memory_length: int = 0
  attention_impl: str = 'xla'
  remat: str = 'none'
  scan_layers: bool = False
  logits_bias: bool = False
  output_rsqrt_scale: bool = False
  dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, config, vocab_size: int) -> 'ModelConfig':
    fields = {f.name for f in dataclasses.fields(cls)} - {'vocab_size', 'dtype'}
    return cls(vocab_size=vocab_size, dtype=precision.compute_dtype(config.dtype),
               **{name: config[name] for name in fields})


def local_window(cfg: ModelConfig) -> Optional[int]:
  """The window of local self-attention, or None for full attention (attention_kinds.py)."""
  return cfg.attention_window if cfg.attention_kind == 'local' else None


def attention_stride(cfg: ModelConfig) -> Optional[int]:
  """The stride of strided self-attention, also the window of its local part, or None for
  another kind (attention_kinds.py)."""
  return cfg.attention_window if cfg.attention_kind == 'strided' else None


def ring_cache_size(cfg: ModelConfig) -> Optional[int]:
  """The slots of local attention's ring-buffer decoding cache (attention.DecodeCursor), or None:
  a cache as long as the decode. Only local attention has one: its queries never read a key
  attention_window or more positions back (strided attention's reach the whole way back).
  A query's own key comes with the new keys, so attention_window - 1 slots would do; one more
  keeps a window of 1 from an empty ring. Global tokens (num_global_tokens) are read by every
  query however far back: they take the linear cache."""
  return (cfg.attention_window if cfg.attention_kind == 'local' and not cfg.num_global_tokens
          else None)


def memory_positions(positions_BxL: Array, memory_length: int) -> Array:
  """The positions of a Transformer-XL memory's tokens [B, M]: the M that came just before the
  segment whose positions are positions_BxL (it starts each row at its first position)."""
  return positions_BxL[:, :1] + jnp.arange(-memory_length, 0)[None, :]


def norm(name: str, cfg: ModelConfig) -> nn.Module:
  """The config's norm (LayerNorm or RMSNorm) over the model width."""
  return norms.make_norm(cfg.norm, cfg.norm_epsilon, name)


class Embedder(nn.Module):
  """Token embedding x sqrt(W) + positional encoding (+ token-type embedding), then dropout.

  W is the embedding width: d_model, or embedding_dim < d_model (ALBERT's factorised embedding:
  V x W tables, then a W -> D projection after the dropout). scale_embeddings=False drops the
  x sqrt(W) (BERT, GPT-2); embedding_norm adds a norm before the dropout (BERT). Rotary and
  logit-bias positions act in attention instead (positions.py).

  `attend` maps width-W states back to vocabulary logits with the same table (weight tying).
  """
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    width, axis = (cfg.embedding_dim, None) if cfg.embedding_dim else (cfg.d_model, 'embed')
    init = nn.initializers.normal(stddev=width ** -0.5)  # Unit variance after the scale.
    table = lambda size, name_init, axes: nn.Embed(
        size, width, dtype=jnp.float32, param_dtype=jnp.float32,
        embedding_init=nn.with_logical_partitioning(name_init, axes))
    self.tokens = table(cfg.vocab_size, init, ('vocab', axis))
    if cfg.positional == 'learned':
      self.positions = table(cfg.max_len, nn.initializers.normal(0.02), (None, axis))
    elif cfg.positional not in positions.KINDS:
      raise ValueError(f'positional must be one of {", ".join(positions.KINDS)}, got '
                       f'{cfg.positional!r}')
    if cfg.num_token_types:
      self.token_types = table(cfg.num_token_types, nn.initializers.normal(0.02), (None, axis))
    if cfg.embedding_norm:
      self.norm = norms.make_norm(cfg.norm, cfg.norm_epsilon, 'norm', axis_name=axis)
    self.dropout = nn.Dropout(cfg.dropout_rate)
    if cfg.embedding_dim:
      self.project = dense(cfg.d_model, (None, 'embed'), cfg.dtype, 'project')

  def __call__(self, ids_BxL: Array, positions_BxL: Array, token_types_BxL: Optional[Array],
               *, deterministic: bool) -> Array:
    cfg = self.cfg
    x_BxLxW = self.tokens(ids_BxL)
    width = x_BxLxW.shape[-1]
    if cfg.scale_embeddings:
      x_BxLxW = x_BxLxW * jnp.sqrt(jnp.asarray(width, jnp.float32))
    if cfg.positional == 'learned':
      x_BxLxW = x_BxLxW + self.positions(positions_BxL)
    elif cfg.positional == 'sinusoidal':
      x_BxLxW = x_BxLxW + positions.sinusoidal_encoding(positions_BxL, width,
                                                        cfg.sinusoidal_layout)
    if cfg.num_token_types:
      types_BxL = jnp.zeros_like(ids_BxL) if token_types_BxL is None else token_types_BxL
      x_BxLxW = x_BxLxW + self.token_types(types_BxL)
    if cfg.embedding_norm:
      x_BxLxW = self.norm(x_BxLxW)
    x_BxLxW = self.dropout(x_BxLxW, deterministic=deterministic)
    return self.project(x_BxLxW) if cfg.embedding_dim else x_BxLxW

  def attend(self, x_BxLxW: Array) -> Array:
    return precision.einsum('blw,vw->blv', x_BxLxW, self.tokens.embedding, self.cfg.dtype)


# config.activation -> function. gelu is the exact erf form; gelu_tanh its tanh approximation
# (GPT-2's "gelu_new", and what jax.nn.gelu computes by default).
ACTIVATIONS = {
    'relu': nn.relu,
    'gelu': lambda x: nn.gelu(x, approximate=False),
    'gelu_tanh': lambda x: nn.gelu(x, approximate=True),
    'silu': nn.silu,
}


def activation_fn(name: str):
  """The elementwise function called name in ACTIVATIONS (config.activation)."""
  if name not in ACTIVATIONS:
    raise ValueError(f'activation must be one of {", ".join(ACTIVATIONS)}, got {name!r}')
  return ACTIVATIONS[name]


FFN_KINDS = ('dense', 'gated')


class FeedForward(nn.Module):
  """Position-wise feed-forward, F = d_ff hidden units:

    dense  FFN(x) = act(x W_i + b_i) W_o + b_o                  (the paper)
    gated  FFN(x) = (act(x W_gate) * (x W_i)) W_o               (GLU family: GEGLU with gelu,
                                                                 SwiGLU with silu)
  ffn_bias=False drops the biases (T5, Llama).
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD: Array) -> Array:
    cfg = self.cfg
    if cfg.ffn not in FFN_KINDS:
      raise ValueError(f'ffn must be one of {", ".join(FFN_KINDS)}, got {cfg.ffn!r}')
    act = activation_fn(cfg.activation)
    hidden = lambda name: dense(cfg.d_ff, ('embed', 'mlp'), cfg.dtype, name,
                                use_bias=cfg.ffn_bias)(x_BxLxD)
    h_BxLxF = hidden('wi')
    h_BxLxF = act(hidden('gate')) * h_BxLxF if cfg.ffn == 'gated' else act(h_BxLxF)
    return dense(x_BxLxD.shape[-1], ('mlp', 'embed'), cfg.dtype, 'wo', use_bias=cfg.ffn_bias)(
        h_BxLxF)


class Block(nn.Module):
  """Self-attention, optional cross-attention (decoder), feed-forward; each as a residual sublayer.

  post-LN (paper): x = LN(x + Dropout(f(x)));  pre-LN: x = x + Dropout(f(LN(x))).
  """
  cfg: ModelConfig
  cross_attention: bool = False
  causal: bool = False  # its self-attention is causal (local attention reads no later block)

  def _residual(self, x_BxLxD, sublayer, name, deterministic, memory_BxMxD=None):
    """x plus the sublayer's dropped-out output, normalised before or after. A Transformer-XL
    memory (the states of the tokens before x) is normalised as x is and given to the sublayer
    as its second argument."""
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout_rate)
    layer_norm = norm(f'{name}_norm', cfg)
    if cfg.pre_ln:
      context = () if memory_BxMxD is None else (layer_norm(memory_BxMxD),)
      return x_BxLxD + drop(sublayer(layer_norm(x_BxLxD), *context), deterministic=deterministic)
    context = () if memory_BxMxD is None else (memory_BxMxD,)
    return layer_norm(x_BxLxD + drop(sublayer(x_BxLxD, *context), deterministic=deterministic))

  @nn.compact
  def __call__(self, x_BxLxD: Array, self_mask: Optional[Array],
               encoded_BxSxD: Optional[Array] = None, cross_mask: Optional[Array] = None,
               deterministic: bool = True, decode: bool = False,
               cache_slot: Optional[Array] = None, positions_BxL: Optional[Array] = None,
               logit_bias_BxHxLxK: Optional[Array] = None,
               cache_index: Optional[int] = None,
               memory_BxMxD: Optional[Array] = None) -> Array:
    """positions_BxL of x's tokens serve rotary positions; logit_bias_BxHxLxK is added to the
    self-attention's logits; cache_index keeps one decoding cache per depth of a shared block.
    memory_BxMxD (Transformer-XL): this layer's inputs at the M tokens before x, which the
    self-attention reads as keys and values before x's own (self_mask then spans M + L keys).
    Arguments are positional where Stack calls it, so that remat can hold the Python ones static
    (BLOCK_STATIC_ARGNUMS)."""
    cfg = self.cfg

    def attention(name, positional: bool):
      return MultiHeadAttention(
          cfg.num_heads, cfg.attention_dropout_rate, cfg.dtype, use_bias=cfg.attention_bias,
          num_kv_heads=cfg.num_kv_heads, scale_logits=cfg.scale_attention,
          qk_norm=cfg.norm if cfg.qk_norm else None, norm_epsilon=cfg.norm_epsilon,
          rope_theta=cfg.rope_theta if positional and cfg.positional == positions.ROTARY
          else None, attention_window=local_window(cfg) if positional else None,
          causal=self.causal, low_rank_dim=cfg.low_rank_dim
          if positional and cfg.attention_kind == 'low_rank' else None, max_len=cfg.max_len,
          impl=cfg.attention_impl, ring_cache_size=ring_cache_size(cfg) if positional else None,
          num_global_tokens=cfg.num_global_tokens if positional else 0,
          stride=attention_stride(cfg) if positional else None,
          lsh_buckets=cfg.lsh_buckets if positional and cfg.attention_kind == 'lsh' else None,
          lsh_rounds=cfg.lsh_rounds, lsh_chunk=cfg.attention_window,
          fixed_kv=not positional, name=name)

    kv_positions_BxK = None
    if memory_BxMxD is not None:
      kv_positions_BxK = jnp.concatenate(
          [memory_positions(positions_BxL, memory_BxMxD.shape[1]), positions_BxL], axis=1)

    def self_attention(h_BxLxD, memory_BxMxD=None):
      kv_BxKxD = (h_BxLxD if memory_BxMxD is None
                  else jnp.concatenate([memory_BxMxD, h_BxLxD], axis=1))
      return attention('self_attention', True)(
          h_BxLxD, kv_BxKxD, self_mask, deterministic=deterministic, decode=decode,
          cache_slot=cache_slot, positions_BxQ=positions_BxL,
          logit_bias_BxHxQxK=logit_bias_BxHxLxK, cache_index=cache_index,
          kv_positions_BxK=kv_positions_BxK)

    x_BxLxD = self._residual(x_BxLxD, self_attention, 'self_attention', deterministic,
                             memory_BxMxD)
    if self.cross_attention:  # Positions do not apply across two sequences.
      x_BxLxD = self._residual(
          x_BxLxD, lambda h: attention('cross_attention', False)(
              h, encoded_BxSxD, cross_mask, deterministic=deterministic, decode=decode,
              cache_index=cache_index),
          'cross_attention', deterministic)
    return self._residual(x_BxLxD, FeedForward(cfg, name='ffn'), 'ffn', deterministic)


# config.remat -> what the backward pass keeps of each block's forward (jax.checkpoint_policies);
# the rest is recomputed. none: keep everything (no remat); full: keep only the block's inputs;
# dots: keep every matmul's output; dots_no_batch: keep the projections' and feed-forward's
# outputs, recompute the attention logits and weights (the part that grows with length squared).
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
BLOCK_STATIC_ARGNUMS = (5, 6, 10)  # deterministic, decode, cache_index (self is 0)
SCANNED_LAYERS = 'layers'  # scan_layers: the one name of a stack's layers, stacked on axis 0


class ScannedBlock(Block):
  """A Block as the body of nn.scan over depth: the residual stream is the carry."""

  def __call__(self, x_BxLxD, *args):
    return super().__call__(x_BxLxD, *args), None


def block_type(cfg: ModelConfig, decode: bool, scanned: bool = False) -> type[nn.Module]:
  """Block (or ScannedBlock), under remat with the config's policy except when decoding."""
  block = ScannedBlock if scanned else Block
  if cfg.remat == 'none' or decode:
    return block
  return nn.remat(block, policy=REMAT_POLICIES[cfg.remat], static_argnums=BLOCK_STATIC_ARGNUMS)


def scanned_stack(cfg: ModelConfig, decode: bool, num_layers: int) -> type[nn.Module]:
  """num_layers Blocks as one Block scanned over depth (scan_layers): XLA compiles one layer, not
  num_layers, so compile time stays flat with depth. Parameters, caches and sown attention weights
  gain a leading axis of num_layers (logical axis 'layers', never sharded)."""
  return nn.scan(block_type(cfg, decode, scanned=True),
                 variable_axes={'params': 0, 'cache': 0, 'intermediates': 0},
                 split_rngs={'params': True, 'dropout': True}, in_axes=nn.broadcast,
                 length=num_layers, metadata_params={nn.PARTITION_NAME: SCANNED_LAYERS})


class Stack(nn.Module):
  """num_layers Blocks, plus the final norm that pre-LN needs.

  share_layers (ALBERT) applies one Block, one set of parameters, at every depth; scan_layers
  scans one Block over depth, its parameters stacked (the same model, compiled once per stack).

  A logit-bias positional scheme is computed once per stack and shared by its layers (T5 keeps
  one relative-bias table per stack); `causal` picks T5's one-sided bucketing.

  memory_length (Transformer-XL, Dai et al. 2019, §3.2): when the caller passes a 'memory'
  collection (objectives.forward_with_memory), each layer's self-attention also reads that
  layer's inputs at the last memory_length tokens before this segment, through a stop-gradient,
  at positions -M .. -1 relative to it; afterwards the memory keeps the last memory_length of
  them and of this segment's. Its variables are batch-first: 'hidden' [B, layers, M, D] and
  'valid' [B, M] (which slots hold a real token: none at first). Without the collection the
  stack reads the segment alone (generation, visualisation). Positions are the config's relative
  ones (rotary, T5's bias, ALiBi), in place of the paper's own relative encoding (§3.3).
  """
  cfg: ModelConfig
  num_layers: int
  cross_attention: bool = False
  causal: bool = False

  @nn.compact
  def __call__(self, x_BxLxD, self_mask, *, encoded_BxSxD=None, cross_mask=None,
               deterministic=True, decode=False, cache_slot=None, positions_BxL=None,
               kv_positions_BxK=None, valid_BxL=None):
    cfg = self.cfg
    remembers = cfg.memory_length and not decode and (
        self.has_variable('memory', 'hidden') or self.is_mutable_collection('memory'))
    memory_BxNxMxD = None
    if remembers:
      batch, _, d_model = x_BxLxD.shape
      hidden = self.variable('memory', 'hidden', jnp.zeros,
                             (batch, self.num_layers, cfg.memory_length, d_model), x_BxLxD.dtype)
      remembered = self.variable('memory', 'valid', jnp.zeros, (batch, cfg.memory_length),
                                 jnp.bool_)
      memory_BxNxMxD = jax.lax.stop_gradient(hidden.value)
      # Every memory token precedes every query: causality holds; only empty slots are masked.
      self_mask = jnp.concatenate([jnp.broadcast_to(
          remembered.value[:, None, None, :], (*self_mask.shape[:3], cfg.memory_length)),
                                   self_mask], axis=-1)
      kv_positions_BxK = jnp.concatenate(
          [memory_positions(positions_BxL, cfg.memory_length), positions_BxL], axis=1)
    # The (query, key) positions of the logits: the cache's keys when decoding, else every key,
    # or those of each part of local attention (its blocks; with global tokens, its blocks with
    # the global keys and its global queries) and of strided attention (attention_kinds.py).
    pairs = [(positions_BxL, positions_BxL if kv_positions_BxK is None else kv_positions_BxK)]
    if kv_positions_BxK is None and (local_window(cfg) or attention_stride(cfg)):
      length = positions_BxL.shape[1]
      parts = (attention_kinds.local_parts(length, cfg.attention_window, self.causal,
                                           cfg.num_global_tokens)
               if local_window(cfg)
               else attention_kinds.strided_parts(length, cfg.attention_window, self.causal))
      pairs = [tuple(attention_kinds.fold(attention_kinds.gather_blocks(positions_BxL, idx))
                     for idx in part) for part in parts]
    biases = None
    if cfg.positional == 'relative_bias':
      relative_bias = positions.RelativeBias(
          cfg.num_heads, cfg.relative_buckets, cfg.relative_max_distance,
          bidirectional=not self.causal, name='relative_bias')
      biases = [relative_bias(q_positions, kv_positions) for q_positions, kv_positions in pairs]
    elif cfg.positional == 'alibi':
      biases = [positions.alibi_bias(q_positions, kv_positions, cfg.num_heads)
                for q_positions, kv_positions in pairs]
    # A strided pass's two parts (a local pass's, with global tokens) take a tuple of biases, as
    # they take a tuple of masks.
    logit_bias = None if biases is None else biases[0] if len(biases) == 1 else tuple(biases)
    args = (self_mask, encoded_BxSxD, cross_mask, deterministic, decode, cache_slot,
            positions_BxL, logit_bias)
    if cfg.scan_layers:
      x_BxLxD, _ = scanned_stack(cfg, decode, self.num_layers)(
          cfg, self.cross_attention, self.causal, name=SCANNED_LAYERS)(x_BxLxD, *args, None)
    else:
      block = block_type(cfg, decode)
      if cfg.share_layers:
        blocks = [block(cfg, self.cross_attention, self.causal, name='layer')] * self.num_layers
      else:
        blocks = [block(cfg, self.cross_attention, self.causal, name=f'layer_{i}')
                  for i in range(self.num_layers)]
      layer_inputs = []
      for i, layer in enumerate(blocks):
        layer_inputs.append(x_BxLxD)
        x_BxLxD = layer(x_BxLxD, *args, i if cfg.share_layers else None,
                        None if memory_BxNxMxD is None else memory_BxNxMxD[:, i])
      if remembers and self.is_mutable_collection('memory'):
        keep = lambda old, new: jnp.concatenate([old, new], axis=-2)[..., -cfg.memory_length:, :]
        hidden.value = jax.lax.stop_gradient(keep(hidden.value, jnp.stack(layer_inputs, axis=1)))
        remembered.value = keep(remembered.value[..., None], valid_BxL[..., None])[..., 0]
    if cfg.pre_ln:
      x_BxLxD = norm('final_norm', cfg)(x_BxLxD)
    return x_BxLxD
