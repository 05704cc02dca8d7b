"""GPT2LMHeadModel <-> gpt_causal: pre-LN, learned positions, unscaled embeddings, biases
everywhere, q/k/v fused in one Conv1D (whose weight is already [in, out]), tied output."""

from transformer.interop.rules import (ACTIVATIONS_FROM_HF, ACTIVATIONS_TO_HF, Rule,
                                       layer_norm_rules, refuse_unless, require)

MODEL_TYPE = 'gpt2'
ARCHITECTURE = 'GPT2LMHeadModel'
VARIANT = 'gpt_causal'
NO_LOGITS_BIAS = '(GPT-2 has no logit bias)'


def config_from_hf(hf: dict, needs_logits_bias: bool) -> dict:
  require(hf, 'scale_attn_weights', (True,), True)
  require(hf, 'scale_attn_by_inverse_layer_idx', (False,), False)
  require(hf, 'add_cross_attention', (False,), False)
  require(hf, 'tie_word_embeddings', (True,), True)
  activation = require(hf, 'activation_function', tuple(ACTIVATIONS_FROM_HF), 'gelu_new')
  d_model = hf['n_embd']
  return dict(d_model=d_model, num_heads=hf['n_head'], num_layers=hf['n_layer'],
              d_ff=hf.get('n_inner') or 4 * d_model,
              activation=ACTIVATIONS_FROM_HF[activation], max_len=hf['n_positions'],
              norm_epsilon=hf.get('layer_norm_epsilon', 1e-5), pre_ln=True,
              positional='learned', scale_embeddings=False, attention_bias=True,
              embedding_norm=False, tie_output=True, num_token_types=0,
              logits_bias=needs_logits_bias, dropout_rate=hf.get('resid_pdrop', 0.1),
              attention_dropout_rate=hf.get('attn_pdrop', 0.1))


def special_ids(hf: dict) -> dict:
  return dict(bos=hf.get('bos_token_id'), eos=hf.get('eos_token_id'),
              pad=hf.get('pad_token_id'))


def config_to_hf(config, hf_vocab_size: int, specials: dict) -> dict:
  refuse_unless(config.attention_bias and config.ffn_bias, 'GPT-2 has biases in attention and '
                'feed-forward: export needs attention_bias=True and ffn_bias=True.')
  refuse_unless(config.pre_ln, 'GPT-2 is pre-LN: export needs --config.pre_ln=True.')
  refuse_unless(config.positional == 'learned', 'GPT-2 has learned positions: export needs '
                "positional='learned'.")
  refuse_unless(not config.scale_embeddings, 'GPT-2 does not scale its token embeddings: '
                'export needs a model trained with scale_embeddings=False.')
  refuse_unless(not config.embedding_norm and not config.num_token_types and config.tie_output,
                'GPT-2 has no embedding norm, no token types and a tied output: export needs '
                'embedding_norm=False, num_token_types=0, tie_output=True.')
  return dict(model_type=MODEL_TYPE, architectures=[ARCHITECTURE], vocab_size=hf_vocab_size,
              n_embd=config.d_model, n_head=config.num_heads, n_layer=config.num_layers,
              n_inner=config.d_ff, n_positions=config.max_len,
              activation_function=ACTIVATIONS_TO_HF[config.activation],
              layer_norm_epsilon=config.norm_epsilon, resid_pdrop=config.dropout_rate,
              embd_pdrop=config.dropout_rate, attn_pdrop=config.attention_dropout_rate,
              bos_token_id=specials.get('bos'), eos_token_id=specials.get('eos'),
              pad_token_id=specials.get('pad'), tie_word_embeddings=True)


def rules(config) -> list[Rule]:
  out = [Rule('embedder/tokens/embedding', 'transformer.wte.weight', 'rows'),
         Rule('embedder/positions/embedding', 'transformer.wpe.weight')]
  for i in range(config.num_layers):
    ours, hf = f'stack/layer_{i}', f'transformer.h.{i}'
    for index, name in enumerate(('query', 'key', 'value')):
      out += [Rule(f'{ours}/self_attention/{name}/kernel', f'{hf}.attn.c_attn.weight', 'part',
                   index, 3),
              Rule(f'{ours}/self_attention/{name}/bias', f'{hf}.attn.c_attn.bias', 'part',
                   index, 3)]
    out += [Rule(f'{ours}/self_attention/out/kernel', f'{hf}.attn.c_proj.weight'),
            Rule(f'{ours}/self_attention/out/bias', f'{hf}.attn.c_proj.bias'),
            Rule(f'{ours}/ffn/wi/kernel', f'{hf}.mlp.c_fc.weight'),
            Rule(f'{ours}/ffn/wi/bias', f'{hf}.mlp.c_fc.bias'),
            Rule(f'{ours}/ffn/wo/kernel', f'{hf}.mlp.c_proj.weight'),
            Rule(f'{ours}/ffn/wo/bias', f'{hf}.mlp.c_proj.bias'),
            *layer_norm_rules(f'{ours}/self_attention_norm', f'{hf}.ln_1'),
            *layer_norm_rules(f'{ours}/ffn_norm', f'{hf}.ln_2')]
  out += layer_norm_rules('stack/final_norm', 'transformer.ln_f')
  if config.logits_bias:
    out.append(Rule('output_head/bias', NO_LOGITS_BIAS, 'bias'))
  return out
