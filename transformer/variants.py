"""The variant registry: what makes each member of the family, in one table.

A variant is a model (one of the two shapes in models.py, with its mask and head), a data
objective (transformer/data/pipelines.py: how a corpus becomes batches with targets and weights)
and what it can do beyond training and validation loss. Every other module asks this table
instead of comparing variant names; adding a variant is one `register` call (or one entry below)
plus a config file.

  variant        model                                   data         abilities
  original       EncoderDecoder                          translation  translate (BLEU)
  bert_mlm       SingleStack(bidirectional, mlm head)    masked_lm    fill_mask
  gpt_causal     SingleStack(causal, lm head)            causal_lm    generate
  unilm_prefix   SingleStack(prefix, lm head)            prefix_lm    translate (BLEU)
"""

import dataclasses
from typing import Any

import flax.linen as nn
import numpy as np

from transformer import models
from transformer.layers import ModelConfig


@dataclasses.dataclass(frozen=True)
class Variant:
  """One variant: its model, the objective that makes its batches, and what it can do."""
  model: type[nn.Module]  # models.EncoderDecoder or models.SingleStack
  model_kwargs: dict[str, Any]  # e.g. SingleStack's mask_kind and head
  data: str  # the objective of transformer/data/pipelines.py that makes its batches
  translates: bool = False  # --mode=translate, BLEU in validation and --mode=eval
  generates: bool = False  # --mode=generate, a sample at each validation
  fills_masks: bool = False  # --mode=fill_mask

  @property
  def encoder_decoder(self) -> bool:
    return self.model is models.EncoderDecoder


VARIANTS: dict[str, Variant] = {
    'original': Variant(models.EncoderDecoder, {}, 'translation', translates=True),
    'bert_mlm': Variant(models.SingleStack, dict(mask_kind='bidirectional', head='mlm'),
                        'masked_lm', fills_masks=True),
    'gpt_causal': Variant(models.SingleStack, dict(mask_kind='causal', head='lm'), 'causal_lm',
                          generates=True),
    'unilm_prefix': Variant(models.SingleStack, dict(mask_kind='prefix', head='lm'), 'prefix_lm',
                            translates=True),
}


def register(name: str, variant: Variant):
  """Adds a variant (an extension, or a test's toy); its config sets config.variant = name."""
  if name in VARIANTS:
    raise ValueError(f'variant {name!r} is already registered')
  VARIANTS[name] = variant


def get(name: str) -> Variant:
  """The registered variant called name (config.variant); ValueError naming the known ones."""
  if name not in VARIANTS:
    raise ValueError(f'Unknown variant {name!r}; expected one of {", ".join(VARIANTS)}.')
  return VARIANTS[name]


def able(ability: str) -> list[str]:
  """The variants that have `ability` (translates | generates | fills_masks), for messages."""
  return [name for name, variant in VARIANTS.items() if getattr(variant, ability)]


def build_model(config, vocab_size: int) -> nn.Module:
  """The Flax module of config.variant, with vocab_size from the tokenizer."""
  variant = get(config.variant)
  return variant.model(ModelConfig.from_config(config, vocab_size), **variant.model_kwargs)


def example_batch(config, length: int = 8) -> dict:
  """One row of what the data of config.variant holds (only shapes matter: init, memory)."""
  ids = np.ones((1, length), np.int32)
  batch = {'inputs': ids, 'targets': ids, 'weights': np.ones((1, length), np.float32)}
  if get(config.variant).encoder_decoder:
    batch['decoder_inputs'] = ids
  if get(config.variant).model_kwargs.get('mask_kind') == 'prefix':
    batch['prefix_len'] = np.full((1,), length // 2, np.int32)
  if config.num_token_types:
    batch['token_types'] = np.zeros((1, length), np.int32)
  return batch
