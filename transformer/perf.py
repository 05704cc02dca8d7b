"""Analytic FLOPs and planned memory of a train step, for MFU (its peak: precision.py)."""

from transformer import variants


def keys_per_query(config, length: int, causal: bool) -> int:
  """The keys each query's self-attention computes scores for: all `length`, local attention's
  blocks (2 windows if causal, else 3; with g global tokens, g more, and the g global queries'
  `length` keys: g more per query on average), strided attention's local blocks and its
  ceil(L / window) strided keys, each lsh round's blocks (as local's, chunks for windows), or
  low-rank attention's rows (attention_kinds.py)."""
  blocks = min(length, (2 if causal else 3) * config.attention_window)
  if config.attention_kind == 'local':
    return blocks + 2 * min(config.num_global_tokens, length)
  if config.attention_kind == 'strided':
    return blocks + -(-length // config.attention_window)
  if config.attention_kind == 'lsh':
    return config.lsh_rounds * blocks
  if config.attention_kind == 'low_rank':
    return config.low_rank_dim
  return length


def forward_flops(config, vocab_size: int, batch: dict) -> float:
  """Matmul FLOPs of one forward pass over `batch`'s padded shapes (attention included).

  Per token and layer: 2 * (2 D^2 + 2 D D_kv) for the projections (D_kv = the key/value heads'
  width: D without grouped-query attention; lsh has no key projection, and its hashing's
  2 * D * lsh_buckets / 2 per round is left out), 2 * 2 D F for the feed-forward (2 * 3 D F
  gated), plus 2 * 2 * K * D for the attention scores and weighted sum over K keys
  (keys_per_query); cross-attention adds its projections and 4 * S * D; the output layer
  2 * D * V per token. A Transformer-XL memory of M tokens adds M keys per query and the
  key/value projections of the M tokens, 2 * 2 D D_kv per token and layer.
  """
  d, f = config.d_model, config.d_ff
  d_kv = (config.num_kv_heads or config.num_heads) * (d // config.num_heads)
  attention = 2 * (2 * d * d + 2 * d * d_kv)
  self_attention = attention - (2 * d * d_kv if config.attention_kind == 'lsh' else 0)
  block = self_attention + 2 * (3 if config.ffn == 'gated' else 2) * d * f
  variant = variants.get(config.variant)
  if variant.encoder_decoder:
    b, s = batch['inputs'].shape
    t = batch['decoder_inputs'].shape[1]
    encoder = b * s * config.num_layers * (block + 4 * keys_per_query(config, s, False) * d)
    decoder = b * t * config.num_decoder_layers * (
        block + 4 * keys_per_query(config, t, True) * d + attention + 4 * s * d)
    return float(encoder + decoder + b * t * 2 * d * vocab_size)
  b, length = batch['inputs'].shape
  keys = (keys_per_query(config, length, variant.model_kwargs.get('mask_kind') == 'causal')
          + config.memory_length)
  memory = b * config.memory_length * config.num_layers * 2 * 2 * d * d_kv
  return float(b * length * (config.num_layers * (block + 4 * keys * d) + 2 * d * vocab_size)
               + memory)


def train_step_flops(config, vocab_size: int, batch: dict) -> float:
  """Forward + backward = 3 x forward (the backward pass costs twice the forward)."""
  return 3.0 * forward_flops(config, vocab_size, batch)


def planned_memory_mib(jitted, *args) -> float | None:
  """MiB a jitted function's compiled call plans to hold on each device: its arguments and
  the temporaries XLA allocates (activations, gradients, logits), from its memory analysis, the
  same on every backend. After a first call the compilation is cached: this costs no compile.
  None where the backend gives no analysis."""
  analysis = jitted.lower(*args).compile().memory_analysis()
  if analysis is None:
    return None
  return (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes) / 2 ** 20
