"""Reading a local Hugging Face folder into a workdir, and writing a workdir out as one.

  import_folder(hf_dir, workdir, variant_config)   config.json + weights + tokenizer -> workdir
  export_workdir(config, workdir, out_dir)         checkpoint -> config.json + model.safetensors

Weights are read as data, never as code: safetensors, or a PyTorch file through
torch.load(weights_only=True). No network: transformers is asked for local files only.
"""

import json
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from transformer import checkpoint, context, errors, objectives, optim, sharding, train, variants
from transformer.interop import FAMILIES, exporters, rules as rules_lib
from transformer.interop.rules import UnsupportedConfigError
from transformer.interop.vocab import SPECIALS, VocabMap

TOKENIZER_DIR = 'hf_tokenizer'  # In a converted workdir: tokenizer.json, vocab_map.json, ...
CONVERTED_STEP = 0


# --- Reading a Hugging Face folder ---------------------------------------------------------------

def read_config(hf_dir: str) -> dict:
  path = os.path.join(hf_dir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing: --from_hf needs a Hugging Face model folder.')
  with open(path, encoding='utf-8') as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise UnsupportedConfigError(f'{path}: not valid JSON ({e}).') from None


def family_of(hf_config: dict):
  model_type = hf_config.get('model_type')
  if model_type not in FAMILIES:
    raise UnsupportedConfigError(
        f'config.json: model_type={model_type!r} has no converter; supported: '
        f'{", ".join(sorted(FAMILIES))}.')
  return FAMILIES[model_type]


def read_weights(hf_dir: str) -> dict:
  """name -> float32 array, from model.safetensors (possibly sharded) or pytorch_model.bin."""
  files = sorted(f for f in os.listdir(hf_dir) if f.endswith('.safetensors'))
  tensors = {}
  if files:
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
    for name in files:
      tensors.update(load_file(os.path.join(hf_dir, name)))
  elif os.path.exists(os.path.join(hf_dir, 'pytorch_model.bin')):
    import torch  # pylint: disable=import-outside-toplevel  # only for PyTorch weight files
    path = os.path.join(hf_dir, 'pytorch_model.bin')
    try:
      state = torch.load(path, map_location='cpu', weights_only=True)  # data: never run code
    except Exception as e:  # pylint: disable=broad-except  # torch raises several kinds
      raise UnsupportedConfigError(f'{path} is not a plain weights file (loading it as data '
                                   f'failed: {str(e).splitlines()[0]}).') from None
    tensors = {k: v.float().numpy() for k, v in state.items()}
  else:
    raise FileNotFoundError(f'{hf_dir} has no *.safetensors or pytorch_model.bin weights.')
  # Old checkpoints name LayerNorm parameters gamma and beta.
  renamed = {k.replace('LayerNorm.gamma', 'LayerNorm.weight').replace('LayerNorm.beta',
                                                                      'LayerNorm.bias'): v
             for k, v in tensors.items()}
  return {k: np.asarray(v, np.float32) for k, v in renamed.items()}


def read_tokenizer(hf_dir: str):
  """The folder's fast tokenizer (transformers, local files only) and its special ids."""
  import transformers  # pylint: disable=import-outside-toplevel
  try:
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir, local_files_only=True)
  except Exception as e:  # pylint: disable=broad-except  # transformers raises many kinds
    raise FileNotFoundError(f'{hf_dir}: no tokenizer could be loaded from its files ({e}).') \
        from None
  if not getattr(tok, 'is_fast', False):
    raise UnsupportedConfigError(
        f'{hf_dir}: the tokenizer ({type(tok).__name__}) has no tokenizer.json (a "fast" '
        'tokenizer); the project reads only that format.')
  specials = {name: getattr(tok, f'{name}_token_id', None) for name in SPECIALS}
  return tok, specials


def vocab_map(family, hf_config: dict, tokenizer_specials: dict) -> VocabMap:
  """The relabelling of this model's vocabulary; the model's config wins over its tokenizer."""
  specials = dict(tokenizer_specials)
  specials.update({k: v for k, v in family.special_ids(hf_config).items() if v is not None})
  return VocabMap.build(hf_config['vocab_size'], specials)


# --- Our side ------------------------------------------------------------------------------------

def check_tree(params: dict, config, vocab_size: int):
  """Raises if `params` differs in names or shapes from what the model of config initialises."""
  model = variants.build_model(config, vocab_size)
  expected = jax.eval_shape(lambda: nn.unbox(objectives.init_params(
      model, variants.example_batch(config), jax.random.key(0))))
  flat = lambda tree: {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(x.shape)
                       for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  got, want = flat(params), flat(expected)
  if got != want:
    diff = sorted(set(got.items()) ^ set(want.items()))[:6]
    raise UnsupportedConfigError(f'The converted parameters do not fit the model: {diff}')


def import_folder(hf_dir: str, workdir: str, variant_config) -> tuple:
  """Writes `workdir` (a step-0 checkpoint, config.json, hf_tokenizer/) from a Hugging Face
  folder. variant_config(variant) gives the config the converted fields are written into.
  Returns (config, vocab map)."""
  hf_config = read_config(hf_dir)
  family = family_of(hf_config)
  tensors = read_weights(hf_dir)
  tok, tokenizer_specials = read_tokenizer(hf_dir)
  vocab = vocab_map(family, hf_config, tokenizer_specials)

  config = variant_config(family.VARIANT)
  fields = family.config_from_hf(hf_config, vocab.needs_logits_bias())
  tokenizer_dir = os.path.join(os.path.abspath(workdir), TOKENIZER_DIR)
  with config.unlocked():
    config.update(fields)
    config.update(tokenizer='huggingface', hf_tokenizer_dir=tokenizer_dir, vocab_size=vocab.size,
                  size=f'hf_{family.MODEL_TYPE}', block_size=min(config.block_size, config.max_len))
  params = rules_lib.params_from_hf(family.rules(config), tensors, vocab)
  check_tree(params, config, vocab.size)

  os.makedirs(tokenizer_dir, exist_ok=True)
  tok.save_pretrained(tokenizer_dir)
  vocab.save(os.path.join(tokenizer_dir, 'vocab_map.json'))
  _save_params(config, workdir, params, vocab.size)
  logging.info('Converted %s (%s) into %s: %s parameters, vocabulary %d (%d from the reference).',
               hf_dir, family.ARCHITECTURE, workdir,
               f'{sum(x.size for x in jax.tree.leaves(params)):,}', vocab.size, vocab.hf_size)
  return config, vocab


def _save_params(config, workdir: str, params: dict, vocab_size: int):
  """A fresh train state (new optimizer moments) around `params`, saved as step 0."""
  optimizer = optim.make_optimizer(config)
  params = jax.tree.map(jnp.asarray, params)
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=optimizer.init(params),
                           rng=jax.random.key_data(jax.random.key(config.seed)),
                           nonfinite_steps=jnp.zeros((), jnp.int32),
                           first_nonfinite_step=jnp.full((), -1, jnp.int32), memory={})
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(config.to_dict(), f, indent=2)
  ckpt = checkpoint.Checkpointer(workdir, config, vocab_size)
  if ckpt.all_steps():
    ckpt.close()
    raise FileExistsError(f'{ckpt.directory} already holds checkpoints: convert into a new '
                          '--workdir.')
  ckpt.save(CONVERTED_STEP, state, None)
  ckpt.wait()
  ckpt.close()


# --- Writing a Hugging Face folder ---------------------------------------------------------------

def workdir_vocab(config) -> VocabMap:
  """The vocabulary map of a workdir: its converted one, or ours unchanged."""
  if config.tokenizer == 'huggingface':
    return VocabMap.load(os.path.join(config.hf_tokenizer_dir, 'vocab_map.json'))
  from transformer import data  # pylint: disable=import-outside-toplevel
  return VocabMap.identity(data.get_tokenizer(config).vocab_size)


def restore_params(config, workdir: str, vocab_size: int, which: str = 'latest') -> dict:
  """The parameters of a workdir's checkpoint (`which`: latest or a step), as numpy arrays."""
  model = variants.build_model(config, vocab_size)
  abstract, _ = context.abstract_params(model, config, sharding.make_mesh(config))
  with checkpoint.Checkpointer(workdir, config, vocab_size, read_only=True) as ckpt:
    if not ckpt.all_steps():
      raise errors.MissingError(f'No checkpoint in {ckpt.directory}.')
    params, step = ckpt.restore_params(abstract, step=None if which == 'latest' else int(which))
  logging.info('Exporting step %d of %s.', step, workdir)
  return jax.tree.map(np.asarray, jax.device_get(params))


def _export_config(config):
  """(family, Hugging Face config, vocabulary map): the first reference that can express the
  model of config; UnsupportedConfigError with every reference's reason otherwise."""
  candidates = exporters(config)
  if config.scan_layers:  # the parameter tables name one parameter per layer
    raise UnsupportedConfigError('export reads layer_0, layer_1, ...: train or convert with '
                                 'scan_layers=False.')
  if not candidates:
    raise UnsupportedConfigError(f'variant {config.variant!r} has no Hugging Face counterpart.')
  vocab = workdir_vocab(config)
  specials = {name: int(vocab.our_to_hf[i]) if vocab.our_to_hf[i] >= 0 else None
              for i, name in enumerate(SPECIALS)}
  reasons = []
  for family in candidates:
    try:
      return family, family.config_to_hf(config, vocab.hf_size, specials), vocab
    except UnsupportedConfigError as e:
      reasons.append(f'{family.ARCHITECTURE}: {e}')
  raise UnsupportedConfigError(' '.join(reasons))


def export_workdir(config, workdir: str, out_dir: str, which: str = 'latest') -> dict:
  """Writes config.json, model.safetensors (and the tokenizer of a converted workdir) to out_dir,
  loadable with transformers' from_pretrained. Returns the Hugging Face config dict."""
  family, hf_config, vocab = _export_config(config)
  params = restore_params(config, workdir, vocab.size, which)
  tensors = rules_lib.params_to_hf(family.rules(config), params, vocab)

  import transformers  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  os.makedirs(out_dir, exist_ok=True)
  kwargs = {k: v for k, v in hf_config.items() if k != 'model_type'}
  transformers.AutoConfig.for_model(family.MODEL_TYPE, **kwargs).save_pretrained(out_dir)
  save_file(tensors, os.path.join(out_dir, 'model.safetensors'), metadata={'format': 'pt'})
  if config.tokenizer == 'huggingface':
    for name in os.listdir(config.hf_tokenizer_dir):
      if name != 'vocab_map.json':
        shutil.copy(os.path.join(config.hf_tokenizer_dir, name), out_dir)
  else:
    logging.warning('The %s tokenizer is not exported: token ids are the project\'s own (pad 0, '
                    'unk 1, bos 2, eos 3).', config.tokenizer)
  logging.info('Wrote %s (%s).', out_dir, family.ARCHITECTURE)
  return hf_config
