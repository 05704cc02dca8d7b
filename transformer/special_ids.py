"""The special token ids, the one definition every module uses.

The models mask id 0 (padding) out of attention; the pipelines frame examples with bos/eos
(translation, LM) or cls/sep (masked LM) and write mask; decoding starts at bos and stops at eos.
Tokenizers put these tokens at these ids (the sentencepiece model is trained so and checked on
load; a converted Hugging Face vocabulary is relabelled into them, transformer/interop/vocab.py).
"""

NAMES = ('pad', 'unk', 'bos', 'eos', 'mask', 'cls', 'sep')  # in id order
PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID, CLS_ID, SEP_ID = range(len(NAMES))
NUM_SPECIAL = len(NAMES)  # Ids below this are special; real tokens start here.
