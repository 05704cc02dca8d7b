"""Hugging Face checkpoints in and out: one module per reference architecture.

  marian.py  MarianMTModel                <-> original
  t5.py      T5ForConditionalGeneration  <-> original  (v1.0 and v1.1)
  bert.py    BertForMaskedLM              <-> bert_mlm
  gpt2.py    GPT2LMHeadModel              <-> gpt_causal
  llama.py   LlamaForCausalLM             <-> gpt_causal

Each family module declares the same names:
  MODEL_TYPE, ARCHITECTURE, VARIANT                 the Hugging Face names and the project's variant
  config_from_hf(hf, needs_logits_bias) -> dict     config overrides for a Hugging Face config.json
  special_ids(hf) -> dict                           its bos, eos and pad ids (vocab.py relabels them)
  config_to_hf(config, hf_vocab_size, specials)     config.json for export (refusing, with the field
                                                    named, what the reference cannot express)
  rules(config) -> list[rules.Rule]                 parameter by parameter: our path, theirs, layout

Refusals name the field the project cannot express; vocab.py relabels the vocabulary into the
project's special ids; huggingface.py reads and writes the folders. Nothing here imports torch
unless a checkpoint comes as a PyTorch weights file.
"""

from transformer.interop import bert, gpt2, llama, marian, t5

# Hugging Face model_type -> module.
FAMILIES = {family.MODEL_TYPE: family for family in (marian, t5, bert, gpt2, llama)}


def exporters(config) -> list:
  """The families a model of config can be exported as: those of its variant, in order."""
  return [family for family in FAMILIES.values() if family.VARIANT == config.variant]
