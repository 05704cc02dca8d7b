"""The two model shapes of the family; the four variants differ only in mask kind and head
(the table that makes them is transformer/variants.py).

  original      EncoderDecoder                           (bidirectional encoder, causal decoder)
  bert_mlm      SingleStack(mask='bidirectional', head='mlm')
  gpt_causal    SingleStack(mask='causal',        head='lm')
  unilm_prefix  SingleStack(mask='prefix',        head='lm')

Shape suffixes: B batch, S source length, T target length, L length, D width, V vocabulary.
Inputs are int32 ids with 0 = padding. `deterministic=False` enables dropout (rng 'dropout').
With `decode=True` the self-attention keys/values go through a cache ('cache' collection).
"""


import flax.linen as nn
import jax.numpy as jnp

from transformer import masks, norms
from transformer.attention import DecodeCursor, dense
from transformer.layers import (Embedder, ModelConfig, Stack, activation_fn, attention_stride,
                                local_window, norm, ring_cache_size)
from transformer.special_ids import PAD_ID

Array = jnp.ndarray


def self_attention_mask(cfg: ModelConfig, kind: str, valid_BxL: Array, **parts) -> Array:
  """The self-attention mask of a training pass: the whole [B, 1, L, L] for full attention, the
  blocks' [B * N, 1, W, K] for local attention (with global tokens, those of its two parts),
  those of each of its two parts for strided attention, per-token facts for lsh attention,
  which picks its pairs (attention_kinds.py)."""
  if cfg.attention_kind == 'local':
    return masks.local_self_attention_mask(kind, valid_BxL, cfg.attention_window,
                                           cfg.num_global_tokens, **parts)
  if cfg.attention_kind == 'strided':
    return masks.strided_self_attention_mask(kind, valid_BxL, cfg.attention_window, **parts)
  if cfg.attention_kind == 'lsh':
    return masks.token_mask(kind, valid_BxL, **parts)
  return masks.self_attention_mask(kind, valid_BxL, **parts)


def default_positions(ids_BxL: Array) -> Array:
  """Positions 0 .. L-1 of every row, for inputs that are not packed."""
  return jnp.broadcast_to(jnp.arange(ids_BxL.shape[1]), ids_BxL.shape)


def _vocab_bias(module: nn.Module, vocab_size: int) -> Array:
  """A learned per-token logit offset (BERT's MLM decoder bias, Marian's final_logits_bias)."""
  return module.param('bias', nn.with_logical_partitioning(nn.initializers.zeros, ('vocab',)),
                      (vocab_size,), jnp.float32)


class OutputHead(nn.Module):
  """Hidden states -> vocabulary logits (float32), tied to the embedding or a separate matrix."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD: Array, embedder: Embedder) -> Array:
    if self.cfg.output_rsqrt_scale:  # T5: undo the width's growth before the projection
      x_BxLxD = x_BxLxD * self.cfg.d_model ** -0.5
    if self.cfg.tie_output:
      if self.cfg.embedding_dim:  # back to the factorised embedding's width
        x_BxLxD = dense(self.cfg.embedding_dim, ('embed', None), self.cfg.dtype, 'to_embedding',
                        use_bias=False)(x_BxLxD)
      # Embedding entries have std W^-0.5, so logits of unit-variance states have unit scale.
      logits = embedder.attend(x_BxLxD)
    else:
      logits = dense(self.cfg.vocab_size, ('embed', 'vocab'), self.cfg.dtype, 'logits',
                     use_bias=False)(x_BxLxD)
    logits = logits.astype(jnp.float32)
    if self.cfg.logits_bias:
      logits = logits + _vocab_bias(self, self.cfg.vocab_size)[None, None, :]
    return logits


class EncoderDecoder(nn.Module):
  """The "Attention Is All You Need" Transformer."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.source_embedder = Embedder(cfg)
    self.target_embedder = self.source_embedder if cfg.share_embeddings else Embedder(cfg)
    self.encoder = Stack(cfg, cfg.num_layers)
    self.decoder = Stack(cfg, cfg.num_decoder_layers, cross_attention=True, causal=True)
    self.output_head = OutputHead(cfg)
    self.cursor = DecodeCursor('causal', local_window(cfg),  # Variables only when decoding.
                               ring_cache_size(cfg), stride=attention_stride(cfg),
                               num_global=cfg.num_global_tokens)

  def encode(self, inputs_BxS, inputs_positions_BxS=None, inputs_segment_ids_BxS=None, *,
             deterministic=True) -> Array:
    positions = (default_positions(inputs_BxS) if inputs_positions_BxS is None
                 else inputs_positions_BxS)
    x_BxSxD = self.source_embedder(inputs_BxS, positions, None, deterministic=deterministic)
    mask = self_attention_mask(self.cfg, 'bidirectional', inputs_BxS != PAD_ID,
                               segment_ids_BxL=inputs_segment_ids_BxS)
    return self.encoder(x_BxSxD, mask, deterministic=deterministic, positions_BxL=positions)

  def decode(self, encoded_BxSxD, inputs_BxS, decoder_inputs_BxT, decoder_positions_BxT=None,
             inputs_segment_ids_BxS=None, decoder_segment_ids_BxT=None, *, deterministic=True,
             decode=False) -> Array:
    """Decoder logits [B, T, V]. With decode=True, T new tokens continue the cached prefix."""
    valid_BxT = decoder_inputs_BxT != PAD_ID
    cache_slot = kv_positions = None
    if decode:
      # Decoding starts at bos, so every generated token is real (valid) input.
      cache_slot, positions, self_mask, kv_positions = self.cursor(jnp.ones_like(valid_BxT))
    else:
      positions = (default_positions(decoder_inputs_BxT) if decoder_positions_BxT is None
                   else decoder_positions_BxT)
      self_mask = self_attention_mask(self.cfg, 'causal', valid_BxT,
                                      segment_ids_BxL=decoder_segment_ids_BxT)
    cross_mask = masks.cross_attention_mask(inputs_BxS != PAD_ID, decoder_segment_ids_BxT,
                                            inputs_segment_ids_BxS)
    y_BxTxD = self.target_embedder(decoder_inputs_BxT, positions, None,
                                   deterministic=deterministic)
    y_BxTxD = self.decoder(y_BxTxD, self_mask, encoded_BxSxD=encoded_BxSxD,
                           cross_mask=cross_mask, deterministic=deterministic, decode=decode,
                           cache_slot=cache_slot, positions_BxL=positions,
                           kv_positions_BxK=kv_positions)
    return self.output_head(y_BxTxD, self.target_embedder)

  @staticmethod
  def batch_arguments(batch: dict) -> tuple[tuple, dict]:
    """The (args, kwargs) of __call__ held by a data batch."""
    return (batch['inputs'], batch['decoder_inputs']), dict(
        inputs_positions=batch.get('inputs_positions'),
        inputs_segment_ids=batch.get('inputs_segment_ids'),
        decoder_positions=batch.get('decoder_positions'),
        decoder_segment_ids=batch.get('decoder_segment_ids'))

  def __call__(self, inputs_BxS, decoder_inputs_BxT, *, inputs_positions=None,
               inputs_segment_ids=None, decoder_positions=None, decoder_segment_ids=None,
               deterministic=True) -> Array:
    encoded_BxSxD = self.encode(inputs_BxS, inputs_positions, inputs_segment_ids,
                                deterministic=deterministic)
    return self.decode(encoded_BxSxD, inputs_BxS, decoder_inputs_BxT, decoder_positions,
                       inputs_segment_ids, decoder_segment_ids, deterministic=deterministic)


class MlmHead(nn.Module):
  """BERT's MLM transform: dense + activation + norm, then the tied embedding plus a bias.

  With a factorised embedding (ALBERT) the transform maps to the embedding's width.
  """
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD: Array, embedder: Embedder) -> Array:
    cfg = self.cfg
    act = activation_fn(cfg.activation)
    width, axis = (cfg.embedding_dim, None) if cfg.embedding_dim else (cfg.d_model, 'mlp')
    h_BxLxD = act(dense(width, ('embed', axis), cfg.dtype, 'transform')(x_BxLxD))
    h_BxLxD = (norms.make_norm(cfg.norm, cfg.norm_epsilon, 'transform_norm', None)
               if cfg.embedding_dim else norm('transform_norm', cfg))(h_BxLxD)
    bias_V = _vocab_bias(self, self.cfg.vocab_size)
    return embedder.attend(h_BxLxD).astype(jnp.float32) + bias_V[None, None, :]


class SingleStack(nn.Module):
  """One Transformer stack over one sequence; `mask_kind` makes it BERT, GPT or UniLM."""
  cfg: ModelConfig
  mask_kind: str  # bidirectional | causal | prefix
  head: str  # lm | mlm

  def setup(self):
    self.embedder = Embedder(self.cfg)
    self.stack = Stack(self.cfg, self.cfg.num_layers, causal=self.mask_kind == 'causal')
    self.output_head = MlmHead(self.cfg) if self.head == 'mlm' else OutputHead(self.cfg)
    self.cursor = DecodeCursor(self.mask_kind, local_window(self.cfg),  # Only when decoding.
                               ring_cache_size(self.cfg), stride=attention_stride(self.cfg),
                               num_global=self.cfg.num_global_tokens)

  @staticmethod
  def batch_arguments(batch: dict) -> tuple[tuple, dict]:
    """The (args, kwargs) of __call__ held by a data batch."""
    return (batch['inputs'],), {k: batch.get(k) for k in ('positions', 'segment_ids',
                                                          'prefix_len', 'token_types')}

  def __call__(self, inputs_BxL, *, positions=None, segment_ids=None, prefix_len=None,
               token_types=None, deterministic=True, decode=False) -> Array:
    """Logits [B, L, V]. prefix_len [B] (mask 'prefix') is the length of the bidirectional part.

    With decode=True, the L new tokens continue the cached sequence; padding tokens in them
    (e.g. between a padded prompt and its continuation) are never attended to and do not
    advance positions.
    """
    valid_BxL = inputs_BxL != PAD_ID
    cache_slot = kv_positions = None
    if decode:
      cache_slot, positions, mask, kv_positions = self.cursor(valid_BxL, prefix_len)
    else:
      positions = default_positions(inputs_BxL) if positions is None else positions
      # Packed prefix-LM rows carry no prefix_len: each example's source has token type 0.
      in_prefix = None if token_types is None else (token_types == 0) & valid_BxL
      mask = self_attention_mask(self.cfg, self.mask_kind, valid_BxL, prefix_len_B=prefix_len,
                                 in_prefix_BxL=in_prefix, segment_ids_BxL=segment_ids)
    x_BxLxD = self.embedder(inputs_BxL, positions, token_types, deterministic=deterministic)
    x_BxLxD = self.stack(x_BxLxD, mask, deterministic=deterministic, decode=decode,
                         cache_slot=cache_slot, positions_BxL=positions,
                         kv_positions_BxK=kv_positions, valid_BxL=valid_BxL)
    return self.output_head(x_BxLxD, self.embedder)
