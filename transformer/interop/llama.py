"""LlamaForCausalLM <-> gpt_causal: pre-norm with RMSNorm, rotary positions (rotating the two
halves of each head), grouped-query attention, SwiGLU, no biases by default, untied output."""

from transformer.interop.rules import (ACTIVATIONS_FROM_HF, ACTIVATIONS_TO_HF, Rule,
                                       attention_rules, dense_rules, refuse_unless, require)

MODEL_TYPE = 'llama'
ARCHITECTURE = 'LlamaForCausalLM'
VARIANT = 'gpt_causal'
NO_LOGITS_BIAS = '(Llama has no logit bias)'
_ATTENTION = {'query': 'q_proj', 'key': 'k_proj', 'value': 'v_proj', 'out': 'o_proj'}


def _rope_theta(hf: dict) -> float:
  rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  require(rope, 'rope_type', ('default',), 'default')
  return float(rope.get('rope_theta', hf.get('rope_theta', 10000.0)))


def config_from_hf(hf: dict, needs_logits_bias: bool) -> dict:
  d_model, heads = hf['hidden_size'], hf['num_attention_heads']
  require(hf, 'head_dim', (d_model // heads, None), d_model // heads)
  require(hf, 'pretraining_tp', (1,), 1)
  activation = require(hf, 'hidden_act', tuple(ACTIVATIONS_FROM_HF), 'silu')
  return dict(d_model=d_model, num_heads=heads,
              num_kv_heads=hf.get('num_key_value_heads') or heads,
              num_layers=hf['num_hidden_layers'], d_ff=hf['intermediate_size'], ffn='gated',
              ffn_bias=hf.get('mlp_bias', False), activation=ACTIVATIONS_FROM_HF[activation],
              max_len=hf['max_position_embeddings'], norm='rmsnorm',
              norm_epsilon=hf.get('rms_norm_eps', 1e-6), pre_ln=True, positional='rotary',
              rope_theta=_rope_theta(hf), scale_embeddings=False,
              attention_bias=hf.get('attention_bias', False), embedding_norm=False,
              tie_output=hf.get('tie_word_embeddings', False), num_token_types=0,
              logits_bias=needs_logits_bias, dropout_rate=0.0,
              attention_dropout_rate=hf.get('attention_dropout', 0.0))


def special_ids(hf: dict) -> dict:
  return dict(bos=hf.get('bos_token_id'), eos=hf.get('eos_token_id'),
              pad=hf.get('pad_token_id'))


def config_to_hf(config, hf_vocab_size: int, specials: dict) -> dict:
  refuse_unless(config.pre_ln and config.norm == 'rmsnorm' and config.positional == 'rotary'
                and config.ffn == 'gated', 'Llama is pre-norm with RMSNorm, rotary positions and '
                'a gated feed-forward: export needs pre_ln=True, norm=rmsnorm, '
                "positional='rotary', ffn='gated'.")
  refuse_unless(not (config.scale_embeddings or config.embedding_norm or config.num_token_types
                     or config.qk_norm or config.output_rsqrt_scale)
                and config.scale_attention and config.attention_bias == config.ffn_bias,
                'Llama has none of scale_embeddings, embedding_norm, token types, qk_norm, '
                'output_rsqrt_scale, scales its attention, and has biases in both or neither of '
                'attention and feed-forward: export needs that.')
  return dict(model_type=MODEL_TYPE, architectures=[ARCHITECTURE], vocab_size=hf_vocab_size,
              hidden_size=config.d_model, num_attention_heads=config.num_heads,
              num_key_value_heads=config.num_kv_heads or config.num_heads,
              num_hidden_layers=config.num_layers, intermediate_size=config.d_ff,
              hidden_act=ACTIVATIONS_TO_HF[config.activation],
              max_position_embeddings=config.max_len, rms_norm_eps=config.norm_epsilon,
              rope_parameters={'rope_type': 'default', 'rope_theta': config.rope_theta},
              attention_bias=config.attention_bias, mlp_bias=config.ffn_bias,
              attention_dropout=config.attention_dropout_rate,
              tie_word_embeddings=config.tie_output, bos_token_id=specials.get('bos'),
              eos_token_id=specials.get('eos'), pad_token_id=specials.get('pad'))


def rules(config) -> list[Rule]:
  out = [Rule('embedder/tokens/embedding', 'model.embed_tokens.weight', 'rows')]
  for i in range(config.num_layers):
    ours, hf = f'stack/layer_{i}', f'model.layers.{i}'
    out += [*attention_rules(f'{ours}/self_attention', f'{hf}.self_attn', _ATTENTION,
                             bias=config.attention_bias),
            *dense_rules(f'{ours}/ffn/gate', f'{hf}.mlp.gate_proj', bias=config.ffn_bias),
            *dense_rules(f'{ours}/ffn/wi', f'{hf}.mlp.up_proj', bias=config.ffn_bias),
            *dense_rules(f'{ours}/ffn/wo', f'{hf}.mlp.down_proj', bias=config.ffn_bias),
            Rule(f'{ours}/self_attention_norm/scale', f'{hf}.input_layernorm.weight'),
            Rule(f'{ours}/ffn_norm/scale', f'{hf}.post_attention_layernorm.weight')]
  out.append(Rule('stack/final_norm/scale', 'model.norm.weight'))
  if not config.tie_output:
    out.append(Rule('output_head/logits/kernel', 'lm_head.weight', 'lm_head'))
  if config.logits_bias:
    out.append(Rule('output_head/bias', NO_LOGITS_BIAS, 'bias'))
  return out
