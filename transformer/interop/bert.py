"""BertForMaskedLM <-> bert_mlm: post-LN, learned positions and token types, unscaled embeddings
followed by a LayerNorm, biases everywhere, the MLM transform and a decoder tied to the
embedding with its own bias."""

from transformer.interop.rules import (ACTIVATIONS_FROM_HF, ACTIVATIONS_TO_HF, Rule,
                                       attention_rules, dense_rules, layer_norm_rules,
                                       refuse_unless, require)

MODEL_TYPE = 'bert'
ARCHITECTURE = 'BertForMaskedLM'
VARIANT = 'bert_mlm'
_ATTENTION = {'query': 'self.query', 'key': 'self.key', 'value': 'self.value',
              'out': 'output.dense'}


def config_from_hf(hf: dict, needs_logits_bias: bool) -> dict:
  del needs_logits_bias  # The MLM head always has its bias.
  require(hf, 'position_embedding_type', ('absolute',), 'absolute')
  require(hf, 'is_decoder', (False,), False)
  require(hf, 'add_cross_attention', (False,), False)
  require(hf, 'tie_word_embeddings', (True,), True)
  activation = require(hf, 'hidden_act', tuple(ACTIVATIONS_FROM_HF), 'gelu')
  return dict(d_model=hf['hidden_size'], num_heads=hf['num_attention_heads'],
              num_layers=hf['num_hidden_layers'], d_ff=hf['intermediate_size'],
              activation=ACTIVATIONS_FROM_HF[activation],
              max_len=hf['max_position_embeddings'],
              num_token_types=hf.get('type_vocab_size', 2),
              norm_epsilon=hf.get('layer_norm_eps', 1e-12), pre_ln=False,
              positional='learned', scale_embeddings=False, attention_bias=True,
              embedding_norm=True, tie_output=True, logits_bias=False,
              dropout_rate=hf.get('hidden_dropout_prob', 0.1),
              attention_dropout_rate=hf.get('attention_probs_dropout_prob', 0.1))


def special_ids(hf: dict) -> dict:
  return dict(pad=hf.get('pad_token_id'))


def config_to_hf(config, hf_vocab_size: int, specials: dict) -> dict:
  refuse_unless(config.attention_bias and config.ffn_bias, 'BERT has biases in attention and '
                'feed-forward: export needs attention_bias=True and ffn_bias=True.')
  refuse_unless(not config.pre_ln, 'BERT is post-LN: export needs pre_ln=False.')
  refuse_unless(config.positional == 'learned' and config.num_token_types > 0,
                "BERT has learned positions and token types: export needs positional='learned' "
                'and num_token_types > 0.')
  refuse_unless(config.embedding_norm and not config.scale_embeddings,
                'BERT normalises unscaled embeddings: export needs embedding_norm=True and '
                'scale_embeddings=False.')
  return dict(model_type=MODEL_TYPE, architectures=[ARCHITECTURE], vocab_size=hf_vocab_size,
              hidden_size=config.d_model, num_attention_heads=config.num_heads,
              num_hidden_layers=config.num_layers, intermediate_size=config.d_ff,
              hidden_act=ACTIVATIONS_TO_HF[config.activation],
              max_position_embeddings=config.max_len, type_vocab_size=config.num_token_types,
              layer_norm_eps=config.norm_epsilon, hidden_dropout_prob=config.dropout_rate,
              attention_probs_dropout_prob=config.attention_dropout_rate,
              pad_token_id=specials.get('pad'), tie_word_embeddings=True)


def rules(config) -> list[Rule]:
  out = [Rule('embedder/tokens/embedding', 'bert.embeddings.word_embeddings.weight', 'rows'),
         Rule('embedder/positions/embedding', 'bert.embeddings.position_embeddings.weight'),
         Rule('embedder/token_types/embedding', 'bert.embeddings.token_type_embeddings.weight'),
         *layer_norm_rules('embedder/norm', 'bert.embeddings.LayerNorm')]
  for i in range(config.num_layers):
    ours, hf = f'stack/layer_{i}', f'bert.encoder.layer.{i}'
    out += [*attention_rules(f'{ours}/self_attention', f'{hf}.attention', _ATTENTION),
            *layer_norm_rules(f'{ours}/self_attention_norm', f'{hf}.attention.output.LayerNorm'),
            *dense_rules(f'{ours}/ffn/wi', f'{hf}.intermediate.dense'),
            *dense_rules(f'{ours}/ffn/wo', f'{hf}.output.dense'),
            *layer_norm_rules(f'{ours}/ffn_norm', f'{hf}.output.LayerNorm')]
  out += [*dense_rules('output_head/transform', 'cls.predictions.transform.dense'),
          *layer_norm_rules('output_head/transform_norm', 'cls.predictions.transform.LayerNorm'),
          Rule('output_head/bias', 'cls.predictions.bias', 'bias')]
  return out
