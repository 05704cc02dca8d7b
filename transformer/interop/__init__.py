"""Hugging Face checkpoints in and out: one module per reference architecture.

  marian.py  MarianMTModel     <-> original
  bert.py    BertForMaskedLM   <-> bert_mlm
  gpt2.py    GPT2LMHeadModel   <-> gpt_causal

Each declares its config mapping (refusing, with the field named, what the project cannot
express) and a table of parameter rules (rules.py); vocab.py relabels the vocabulary into the
project's special ids; huggingface.py reads and writes the folders. Nothing here imports torch
unless a checkpoint comes as a PyTorch weights file.
"""

from transformer.interop import bert, gpt2, marian

# Hugging Face model_type -> module.
FAMILIES = {family.MODEL_TYPE: family for family in (marian, bert, gpt2)}
# Our variant -> module (export).
BY_VARIANT = {family.VARIANT: family for family in FAMILIES.values()}
