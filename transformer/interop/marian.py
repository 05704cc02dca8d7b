"""MarianMTModel <-> original: the paper's post-LN encoder-decoder with sinusoidal positions
(sines and cosines in two halves), scaled shared embeddings, biases everywhere, a tied output
plus final_logits_bias. Marian starts decoding from its pad token: that is our bos."""

from transformer.interop.rules import (ACTIVATIONS_FROM_HF, ACTIVATIONS_TO_HF, Rule,
                                       attention_rules, dense_rules, layer_norm_rules,
                                       refuse_unless, require)

MODEL_TYPE = 'marian'
ARCHITECTURE = 'MarianMTModel'
VARIANT = 'original'
LAYER_NORM_EPSILON = 1e-5  # torch.nn.LayerNorm's default, which Marian does not configure.
_ATTENTION = {'query': 'q_proj', 'key': 'k_proj', 'value': 'v_proj', 'out': 'out_proj'}


def config_from_hf(hf: dict, needs_logits_bias: bool) -> dict:
  del needs_logits_bias  # Marian always has final_logits_bias.
  require(hf, 'share_encoder_decoder_embeddings', (True,), True)
  require(hf, 'tie_word_embeddings', (True,), True)
  require(hf, 'decoder_attention_heads', (hf['encoder_attention_heads'],))
  require(hf, 'decoder_ffn_dim', (hf['encoder_ffn_dim'],))
  activation = require(hf, 'activation_function', tuple(ACTIVATIONS_FROM_HF), 'gelu')
  return dict(d_model=hf['d_model'], num_heads=hf['encoder_attention_heads'],
              num_layers=hf['encoder_layers'], num_decoder_layers=hf['decoder_layers'],
              d_ff=hf['encoder_ffn_dim'], activation=ACTIVATIONS_FROM_HF[activation],
              max_len=hf['max_position_embeddings'], norm_epsilon=LAYER_NORM_EPSILON,
              pre_ln=False, positional='sinusoidal', sinusoidal_layout='halves',
              scale_embeddings=hf.get('scale_embedding', False), attention_bias=True,
              embedding_norm=False, share_embeddings=True, tie_output=True, num_token_types=0,
              logits_bias=True, dropout_rate=hf.get('dropout', 0.1),
              attention_dropout_rate=hf.get('attention_dropout', 0.0))


def special_ids(hf: dict) -> dict:
  # The decoder starts from decoder_start_token_id (Marian: its pad), fed where we feed bos.
  return dict(pad=hf.get('pad_token_id'), eos=hf.get('eos_token_id'),
              bos=hf.get('decoder_start_token_id'))


def config_to_hf(config, hf_vocab_size: int, specials: dict) -> dict:
  refuse_unless(config.attention_bias and config.ffn_bias, 'Marian has biases in attention and '
                'feed-forward: export needs attention_bias=True and ffn_bias=True.')
  refuse_unless(not config.pre_ln, 'Marian is post-LN: export needs pre_ln=False.')
  refuse_unless(config.positional == 'sinusoidal' and config.sinusoidal_layout == 'halves',
                "Marian's positions are sinusoids in two halves: export needs "
                "positional='sinusoidal' and sinusoidal_layout='halves'.")
  refuse_unless(config.share_embeddings and config.tie_output and not config.embedding_norm
                and not config.num_token_types,
                'Marian shares and ties one embedding, without norm or token types: export '
                'needs share_embeddings=True, tie_output=True, embedding_norm=False, '
                'num_token_types=0.')
  refuse_unless(config.norm_epsilon == LAYER_NORM_EPSILON,
                f'Marian\'s LayerNorm epsilon is fixed at {LAYER_NORM_EPSILON}: export needs '
                f'norm_epsilon={LAYER_NORM_EPSILON}.')
  return dict(model_type=MODEL_TYPE, architectures=[ARCHITECTURE], vocab_size=hf_vocab_size,
              decoder_vocab_size=hf_vocab_size, d_model=config.d_model,
              encoder_attention_heads=config.num_heads, decoder_attention_heads=config.num_heads,
              encoder_layers=config.num_layers, decoder_layers=config.num_decoder_layers,
              encoder_ffn_dim=config.d_ff, decoder_ffn_dim=config.d_ff,
              activation_function=ACTIVATIONS_TO_HF[config.activation],
              max_position_embeddings=config.max_len, scale_embedding=config.scale_embeddings,
              dropout=config.dropout_rate, attention_dropout=config.attention_dropout_rate,
              activation_dropout=0.0, share_encoder_decoder_embeddings=True,
              tie_word_embeddings=True, pad_token_id=specials.get('pad'),
              eos_token_id=specials.get('eos'), decoder_start_token_id=specials.get('bos'),
              forced_eos_token_id=None)


def rules(config) -> list[Rule]:
  out = [Rule('source_embedder/tokens/embedding', 'model.shared.weight', 'rows'),
         Rule('output_head/bias', 'final_logits_bias', 'bias_row')]
  stacks = (('encoder', 'model.encoder', config.num_layers, ()),
            ('decoder', 'model.decoder', config.num_decoder_layers,
             (('cross_attention', 'encoder_attn'),)))
  for ours_stack, hf_stack, num_layers, cross in stacks:
    for i in range(num_layers):
      ours, hf = f'{ours_stack}/layer_{i}', f'{hf_stack}.layers.{i}'
      for our_name, hf_name in (('self_attention', 'self_attn'), *cross):
        out += [*attention_rules(f'{ours}/{our_name}', f'{hf}.{hf_name}', _ATTENTION),
                *layer_norm_rules(f'{ours}/{our_name}_norm', f'{hf}.{hf_name}_layer_norm')]
      out += [*dense_rules(f'{ours}/ffn/wi', f'{hf}.fc1'),
              *dense_rules(f'{ours}/ffn/wo', f'{hf}.fc2'),
              *layer_norm_rules(f'{ours}/ffn_norm', f'{hf}.final_layer_norm')]
  return out
