"""Hugging Face checkpoints in and out: one module per reference architecture.

  marian.py  MarianMTModel                <-> original
  t5.py      T5ForConditionalGeneration  <-> original  (v1.0 and v1.1)
  bert.py    BertForMaskedLM              <-> bert_mlm
  gpt2.py    GPT2LMHeadModel              <-> gpt_causal
  llama.py   LlamaForCausalLM             <-> gpt_causal

Each declares its config mapping (refusing, with the field named, what the project cannot
express) and a table of parameter rules (rules.py); vocab.py relabels the vocabulary into the
project's special ids; huggingface.py reads and writes the folders. Nothing here imports torch
unless a checkpoint comes as a PyTorch weights file.
"""

from transformer.interop import bert, gpt2, llama, marian, t5

# Hugging Face model_type -> module.
FAMILIES = {family.MODEL_TYPE: family for family in (marian, t5, bert, gpt2, llama)}


def exporters(config) -> list:
  """The families a model of config can be exported as: those of its variant, in order."""
  return [family for family in FAMILIES.values() if family.VARIANT == config.variant]
