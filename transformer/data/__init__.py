"""Data layer: TFDS builders (array_record, no TensorFlow), tokenizers, token ids prepared once
(prepared.py) and grain pipelines reading them by index.

Public API:
  get_tokenizer(config) -> Tokenizer
  make_train_iterator(config, tokenizer, *, process_index=0, process_count=1) -> iterator of batches
  make_eval_batches(config, tokenizer, split='validation', *, process_index=0, process_count=1)
  load_text_pairs(config, split) -> [(source, target)]
"""

from transformer.data.pipelines import load_text_pairs
from transformer.data.pipelines import load_texts
from transformer.data.pipelines import make_eval_batches
from transformer.data.pipelines import make_train_iterator
from transformer.data.pipelines import mask_tokens
from transformer.data.tokenizer import get_tokenizer
from transformer.data.tokenizer import Tokenizer
