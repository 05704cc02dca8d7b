"""One table per reference architecture: which of our parameters is which Hugging Face tensor.

A `Rule` pairs one leaf of our parameter tree ('stack/layer_0/ffn/wi/kernel') with one Hugging
Face tensor name and a transform that is exactly invertible, so the same table converts both ways:

  same      the same array
  linear    a torch.nn.Linear weight [out, in] <-> our Dense kernel [in, out]
  rows      an embedding table [V, D], relabelled by the VocabMap
  lm_head   an untied output weight [V, D] <-> our logits kernel [D, V], relabelled
  bias      a logit bias [V], relabelled; NEVER_LOGIT where no token may be predicted
  bias_row  the same held as [1, V] (Marian's final_logits_bias)
  part      slice `index` of `parts` equal slices along the last axis (GPT-2's fused q, k, v)

A Hugging Face name in parentheses is a tensor the reference does not have (GPT-2's logit bias,
which a relabelled vocabulary needs): it is zero on import and must be zero again on export.
"""

import dataclasses

import numpy as np

from transformer.interop.vocab import VocabMap


class UnsupportedConfigError(ValueError):
  """A reference config uses something this project cannot express (the field is named)."""


@dataclasses.dataclass(frozen=True)
class Rule:
  ours: str  # '/'-joined path in our parameter tree
  hf: str  # tensor name in the Hugging Face state dict
  kind: str = 'same'  # same | linear | rows | lm_head | bias | bias_row | part
  index: int = 0  # kind 'part': which slice
  parts: int = 1  # kind 'part': how many slices


def from_hf(rule: Rule, tensor: np.ndarray, vocab: VocabMap) -> np.ndarray:
  if rule.kind == 'same':
    return tensor
  if rule.kind == 'linear':
    return tensor.T
  if rule.kind == 'rows':
    return vocab.rows_from_hf(tensor)
  if rule.kind == 'lm_head':
    return vocab.rows_from_hf(tensor).T
  if rule.kind in ('bias', 'bias_row'):
    return vocab.bias_from_hf(None if tensor is None else tensor.reshape(-1))
  if rule.kind == 'part':
    return np.split(tensor, rule.parts, axis=-1)[rule.index]
  raise ValueError(f'Unknown rule kind {rule.kind!r}')


def params_from_hf(rules: list[Rule], tensors: dict, vocab: VocabMap) -> dict:
  """Our parameter tree (nested dicts of float32 arrays) from a Hugging Face state dict."""
  # A missing logit bias is zero (Marian's final_logits_bias is optional; GPT-2 has none).
  missing = sorted({r.hf for r in rules
                    if r.hf not in tensors and r.kind not in ('bias', 'bias_row')})
  if missing:
    raise UnsupportedConfigError(f'The weights lack {", ".join(missing[:5])}'
                                 f'{" ..." if len(missing) > 5 else ""}.')
  params = {}
  for rule in rules:
    tensor = tensors.get(rule.hf)
    value = from_hf(rule, None if tensor is None else np.asarray(tensor, np.float32), vocab)
    node = params
    *parents, leaf = rule.ours.split('/')
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = np.asarray(value, np.float32)
  return params


def params_to_hf(rules: list[Rule], params: dict, vocab: VocabMap) -> dict:
  """The Hugging Face state dict (name -> float32 array) of our parameter tree."""
  tensors, parts = {}, {}
  for rule in rules:
    node = params
    for name in rule.ours.split('/'):
      node = node[name]
    value = np.asarray(node, np.float32)
    if rule.kind == 'same':
      tensors[rule.hf] = value
    elif rule.kind == 'linear':
      tensors[rule.hf] = value.T
    elif rule.kind == 'rows':
      tensors[rule.hf] = vocab.rows_to_hf(value)
    elif rule.kind == 'lm_head':
      tensors[rule.hf] = vocab.rows_to_hf(value.T)
    elif rule.kind in ('bias', 'bias_row'):
      bias = vocab.bias_to_hf(value)
      tensors[rule.hf] = bias[None] if rule.kind == 'bias_row' else bias
    elif rule.kind == 'part':
      parts.setdefault(rule.hf, [None] * rule.parts)[rule.index] = value
    else:
      raise ValueError(f'Unknown rule kind {rule.kind!r}')
  for name, slices in parts.items():
    tensors[name] = np.concatenate(slices, axis=-1)
  for name in [n for n in tensors if n.startswith('(')]:
    if np.any(tensors.pop(name)):
      raise UnsupportedConfigError(f'The model has learned a logit bias, and {name[1:-1]}.')
  return {k: np.ascontiguousarray(v) for k, v in tensors.items()}


def attention_rules(ours: str, hf: str, names: dict[str, str], bias: bool = True) -> list[Rule]:
  """q/k/v/out projections: names maps our query|key|value|out to the reference's."""
  return [rule for our, theirs in names.items()
          for rule in dense_rules(f'{ours}/{our}', f'{hf}.{theirs}', bias=bias)]


def layer_norm_rules(ours: str, hf: str) -> list[Rule]:
  return [Rule(f'{ours}/scale', f'{hf}.weight'), Rule(f'{ours}/bias', f'{hf}.bias')]


def dense_rules(ours: str, hf: str, kind: str = 'linear', bias: bool = True) -> list[Rule]:
  return [Rule(f'{ours}/kernel', f'{hf}.weight', kind),
          *([Rule(f'{ours}/bias', f'{hf}.bias')] if bias else [])]


def require(hf_config: dict, field: str, allowed, default=None):
  """The value of `field`, refused with the field named unless it is one of `allowed`."""
  value = hf_config.get(field, default)
  if value not in allowed:
    raise UnsupportedConfigError(
        f'config.json: {field}={value!r} cannot be expressed by this project (supported: '
        f'{", ".join(map(repr, allowed))}).')
  return value


# Hugging Face activation names <-> config.activation.
ACTIVATIONS_FROM_HF = {'relu': 'relu', 'gelu': 'gelu', 'gelu_new': 'gelu_tanh',
                       'gelu_pytorch_tanh': 'gelu_tanh', 'silu': 'silu', 'swish': 'silu'}
ACTIVATIONS_TO_HF = {'relu': 'relu', 'gelu': 'gelu', 'gelu_tanh': 'gelu_new', 'silu': 'silu'}


def refuse_unless(condition: bool, message: str):
  if not condition:
    raise UnsupportedConfigError(message)
