"""T5ForConditionalGeneration (v1.0 and v1.1) <-> original: pre-norm with RMSNorm (no bias),
a bucketed relative position bias per stack (bidirectional in the encoder, causal in the
decoder), no 1/sqrt(d_k) in attention, no biases; v1.0 has a ReLU feed-forward and a tied output
scaled by d_model^-0.5, v1.1 a gated-GELU feed-forward and an untied output. Decoding starts from
the pad token: that is our bos."""

from transformer.interop.rules import (Rule, attention_rules, dense_rules, refuse_unless,
                                       require)

MODEL_TYPE = 't5'
ARCHITECTURE = 'T5ForConditionalGeneration'
VARIANT = 'original'
NO_LOGITS_BIAS = '(T5 has no logit bias)'
MAX_LEN = 512  # T5 has no absolute positions; this only sizes decoding caches.
_ATTENTION = {'query': 'q', 'key': 'k', 'value': 'v', 'out': 'o'}
# feed_forward_proj -> (ffn, activation)
_FEED_FORWARD = {'relu': ('dense', 'relu'), 'gated-gelu': ('gated', 'gelu_tanh'),
                 'gated-silu': ('gated', 'silu'), 'gelu': ('dense', 'gelu_tanh')}
_FEED_FORWARD_TO_HF = {v: k for k, v in _FEED_FORWARD.items()}


def config_from_hf(hf: dict, needs_logits_bias: bool) -> dict:
  d_model, heads = hf['d_model'], hf['num_heads']
  require(hf, 'd_kv', (d_model // heads,))
  ffn, activation = _FEED_FORWARD[require(hf, 'feed_forward_proj', tuple(_FEED_FORWARD), 'relu')]
  tied = hf.get('tie_word_embeddings', True)
  return dict(d_model=d_model, num_heads=heads, num_layers=hf['num_layers'],
              num_decoder_layers=hf.get('num_decoder_layers') or hf['num_layers'],
              d_ff=hf['d_ff'], ffn=ffn, ffn_bias=False, activation=activation, max_len=MAX_LEN,
              norm='rmsnorm', norm_epsilon=hf.get('layer_norm_epsilon', 1e-6), pre_ln=True,
              positional='relative_bias',
              relative_buckets=hf.get('relative_attention_num_buckets', 32),
              relative_max_distance=hf.get('relative_attention_max_distance', 128),
              scale_attention=False, scale_embeddings=False, attention_bias=False,
              embedding_norm=False, share_embeddings=True, tie_output=tied,
              output_rsqrt_scale=hf.get('scale_decoder_outputs', tied), num_token_types=0,
              logits_bias=needs_logits_bias, dropout_rate=hf.get('dropout_rate', 0.1))


def special_ids(hf: dict) -> dict:
  return dict(pad=hf.get('pad_token_id'), eos=hf.get('eos_token_id'),
              bos=hf.get('decoder_start_token_id', hf.get('pad_token_id')))


def config_to_hf(config, hf_vocab_size: int, specials: dict) -> dict:
  refuse_unless(config.pre_ln and config.norm == 'rmsnorm' and config.positional ==
                'relative_bias' and not config.scale_attention,
                'T5 is pre-norm with RMSNorm, a relative position bias and unscaled attention: '
                "export needs pre_ln=True, norm='rmsnorm', positional='relative_bias', "
                'scale_attention=False.')
  refuse_unless(not (config.attention_bias or config.ffn_bias or config.scale_embeddings
                     or config.embedding_norm or config.num_token_types or config.qk_norm
                     or config.num_kv_heads not in (None, config.num_heads))
                and config.share_embeddings,
                'T5 has no biases, unscaled embeddings without norm or token types, no qk_norm, '
                'every head its own keys, and shares its embedding: export needs that.')
  feed_forward = _FEED_FORWARD_TO_HF.get((config.ffn, config.activation))
  refuse_unless(feed_forward is not None, f'T5 has no feed-forward {config.ffn} with '
                f'{config.activation}; it has {", ".join(_FEED_FORWARD)}.')
  return dict(model_type=MODEL_TYPE, architectures=[ARCHITECTURE], vocab_size=hf_vocab_size,
              d_model=config.d_model, d_kv=config.d_model // config.num_heads,
              num_heads=config.num_heads, num_layers=config.num_layers,
              num_decoder_layers=config.num_decoder_layers, d_ff=config.d_ff,
              feed_forward_proj=feed_forward, layer_norm_epsilon=config.norm_epsilon,
              relative_attention_num_buckets=config.relative_buckets,
              relative_attention_max_distance=config.relative_max_distance,
              tie_word_embeddings=config.tie_output,
              scale_decoder_outputs=config.output_rsqrt_scale, dropout_rate=config.dropout_rate,
              pad_token_id=specials.get('pad'), eos_token_id=specials.get('eos'),
              decoder_start_token_id=specials.get('bos'))


def rules(config) -> list[Rule]:
  out = [Rule('source_embedder/tokens/embedding', 'shared.weight', 'rows')]
  ffn = (('gate', 'wi_0'), ('wi', 'wi_1')) if config.ffn == 'gated' else (('wi', 'wi'),)
  stacks = (('encoder', config.num_layers, ()),
            ('decoder', config.num_decoder_layers, (('cross_attention', 'EncDecAttention'),)))
  for stack, num_layers, cross in stacks:
    out += [Rule(f'{stack}/relative_bias/embedding',
                 f'{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight'),
            Rule(f'{stack}/final_norm/scale', f'{stack}.final_layer_norm.weight')]
    for i in range(num_layers):
      ours, hf = f'{stack}/layer_{i}', f'{stack}.block.{i}.layer'
      sublayers = (('self_attention', 'SelfAttention'), *cross)
      for index, (our_name, hf_name) in enumerate(sublayers):
        out += [*attention_rules(f'{ours}/{our_name}', f'{hf}.{index}.{hf_name}', _ATTENTION,
                                 bias=False),
                Rule(f'{ours}/{our_name}_norm/scale', f'{hf}.{index}.layer_norm.weight')]
      last = len(sublayers)
      out += [rule for our_name, hf_name in (*ffn, ('wo', 'wo'))
              for rule in dense_rules(f'{ours}/ffn/{our_name}',
                                      f'{hf}.{last}.DenseReluDense.{hf_name}', bias=False)]
      out.append(Rule(f'{ours}/ffn_norm/scale', f'{hf}.{last}.layer_norm.weight'))
  if not config.tie_output:
    out.append(Rule('output_head/logits/kernel', 'lm_head.weight', 'lm_head'))
  if config.logits_bias:
    out.append(Rule('output_head/bias', NO_LOGITS_BIAS, 'bias'))
  return out
