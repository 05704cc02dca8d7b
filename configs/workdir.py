"""The config a workdir was written with (its config.json), e.g. a model from launch.convert.

Usage: --config=configs/workdir.py:WORKDIR. Overrides apply on top, as with any config file.
"""

import json
import os

from configs import common


def get_config(workdir: str):
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing: --config=configs/workdir.py:WORKDIR needs a '
                            'workdir written by training or by launch.convert.')
  with open(path, encoding='utf-8') as f:
    saved = json.load(f)
  c = common.base_config()
  c.size = ''
  unknown = sorted(set(saved) - set(c.keys()))
  if unknown:
    raise ValueError(f'{path}: unknown config fields {", ".join(unknown)}.')
  c.update(saved)
  tokenizer_dir = os.path.join(workdir, 'hf_tokenizer')
  if c.tokenizer == 'huggingface' and os.path.isdir(tokenizer_dir):
    c.hf_tokenizer_dir = os.path.abspath(tokenizer_dir)  # the workdir may have moved
  c.lock()
  return c
