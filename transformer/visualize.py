"""Plots for looking inside the model: attention maps, positional encodings, LR schedule, masks.

Figures are drawn with matplotlib's object API (Figure + Agg rendering: no display, no pyplot
global state) and saved as PNG through etils.epath (a gs:// workdir works); every function
returns the paths it wrote.

  write_attention_plots(out_dir, model, params, inputs, [decoder_inputs], ...)  one PNG per layer
      and attention kind (encoder self, decoder self, cross; or the single stack's self), heads in
      a grid
  write_teaching_plots(out_dir, schedule=..., num_steps=...)  positional encodings, masks, LR
"""

import math
import os
from collections.abc import Callable, Sequence
from typing import Optional

import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util
from matplotlib.figure import Figure

from transformer import masks
from transformer.layers import SCANNED_LAYERS
from transformer.positions import sinusoidal_encoding

MAX_LABELLED_TOKENS = 60  # Longer sequences get no per-token tick labels (they would overlap).


def _save(fig: Figure, path: str) -> str:
  with epath.Path(path).open('wb') as f:  # a gs:// workdir too
    fig.savefig(f, format='png', dpi=100)
  return path


def _label_tokens(ax, query_labels: Optional[Sequence[str]], key_labels: Optional[Sequence[str]]):
  for labels, set_ticks, set_labels, rotation in (
      (query_labels, ax.set_yticks, ax.set_yticklabels, 0),
      (key_labels, ax.set_xticks, ax.set_xticklabels, 90)):
    if labels is not None and len(labels) <= MAX_LABELLED_TOKENS:
      set_ticks(range(len(labels)))
      set_labels(labels, fontsize=7, rotation=rotation)


# --- Attention -----------------------------------------------------------------------------------

def attention_weights(model, params, *inputs, **model_kwargs) -> dict[str, np.ndarray]:
  """Attention probabilities of one forward pass, for the first example of the batch.

  inputs and model_kwargs are what model.apply takes: (inputs, decoder_inputs) for EncoderDecoder,
  (inputs, prefix_len=..., token_types=...) for SingleStack. Returns one [layers, H, Q, K] array
  per attention kind: 'encoder/self_attention', 'decoder/self_attention',
  'decoder/cross_attention' or 'stack/self_attention'.
  """
  _, state = model.apply({'params': params}, *inputs, mutable=['intermediates'], **model_kwargs)
  layers = {}
  for (stack, layer, kind, _), (weights,) in traverse_util.flatten_dict(
      state['intermediates']).items():
    by_index = layers.setdefault(f'{stack}/{kind}', {})
    if layer == SCANNED_LAYERS:  # scan_layers: every layer in one [layers, B, H, Q, K] array
      by_index.update(enumerate(np.asarray(weights[:, 0])))
    else:
      by_index[int(layer.removeprefix('layer_'))] = np.asarray(weights[0])
  return {name: np.stack([by_index[i] for i in sorted(by_index)])
          for name, by_index in layers.items()}


def plot_attention_heads(weights_HxQxK: np.ndarray, path: str, *, title: str,
                         query_labels: Optional[Sequence[str]] = None,
                         key_labels: Optional[Sequence[str]] = None) -> str:
  """One layer's heads as a near-square grid of query x key heatmaps on a shared 0..1 scale."""
  num_heads = weights_HxQxK.shape[0]
  cols = math.ceil(math.sqrt(num_heads))
  rows = math.ceil(num_heads / cols)
  fig = Figure(figsize=(3.2 * cols + 1.0, 3.2 * rows + 0.6), layout='constrained')
  axes = fig.subplots(rows, cols, squeeze=False)
  for head, ax in enumerate(axes.flat):
    if head >= num_heads:
      ax.set_axis_off()
      continue
    image = ax.imshow(weights_HxQxK[head], vmin=0.0, vmax=1.0, cmap='viridis')
    ax.set_title(f'head {head}', fontsize=9)
    _label_tokens(ax, query_labels, key_labels)
  fig.colorbar(image, ax=axes, shrink=0.6, label='attention probability')
  fig.suptitle(title)
  return _save(fig, path)


def write_attention_plots(out_dir: str, model, params, inputs_1xS, decoder_inputs_1xT=None, *,
                          source_labels: Optional[Sequence[str]] = None,
                          target_labels: Optional[Sequence[str]] = None,
                          **model_kwargs) -> list[str]:
  """Heatmaps of every layer's attention for one sentence (the first row of the inputs).

  EncoderDecoder: pass decoder_inputs (bos + target); labels are the tokens as strings.
  SingleStack: the inputs are the whole sequence (source_labels label it); pass prefix_len and
  token_types for unilm_prefix as model keyword arguments.
  """
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  inputs = (inputs_1xS,) if decoder_inputs_1xT is None else (inputs_1xS, decoder_inputs_1xT)
  labels = {'encoder/self_attention': (source_labels, source_labels),
            'decoder/self_attention': (target_labels, target_labels),
            'decoder/cross_attention': (target_labels, source_labels),
            'stack/self_attention': (source_labels, source_labels)}
  paths = []
  for name, weights_LxHxQxK in attention_weights(model, params, *inputs, **model_kwargs).items():
    query_labels, key_labels = labels[name]
    for layer, weights_HxQxK in enumerate(weights_LxHxQxK):
      file_name = f"{name.replace('/', '_')}_layer{layer}.png"
      paths.append(plot_attention_heads(
          weights_HxQxK, os.path.join(out_dir, file_name),
          title=f"{name.replace('/', ' ').replace('_', '-')}, layer {layer}",
          query_labels=query_labels, key_labels=key_labels))
  return paths


# --- Teaching plots ------------------------------------------------------------------------------

def plot_positional_encoding(path: str, *, length: int = 100, d_model: int = 128) -> str:
  """The sinusoidal encoding as a position x dimension heatmap, and a few of its dimensions."""
  encoding_LxD = np.asarray(sinusoidal_encoding(jnp.arange(length)[None], d_model)[0])
  fig = Figure(figsize=(12, 4.5), layout='constrained')
  heatmap_ax, curves_ax = fig.subplots(1, 2, width_ratios=(3, 2))
  image = heatmap_ax.imshow(encoding_LxD, aspect='auto', cmap='RdBu', vmin=-1, vmax=1)
  heatmap_ax.set(xlabel='dimension', ylabel='position',
                 title=f'Sinusoidal positional encoding (d_model={d_model})')
  fig.colorbar(image, ax=heatmap_ax)
  # Even dimensions are sines whose wavelength grows geometrically with the dimension.
  for fraction in (1 / 32, 1 / 8, 1 / 4, 3 / 8):
    dim = 2 * round(d_model * fraction / 2)
    curves_ax.plot(encoding_LxD[:, dim], label=f'dim {dim}')
  curves_ax.set(xlabel='position', ylabel='value', title='Some even dimensions (sines)')
  curves_ax.legend(fontsize=8)
  return _save(fig, path)


def plot_learning_rate(schedule: Callable[[int], float], num_steps: int, path: str) -> str:
  """Any step -> learning-rate callable over num_steps (sampled at up to 1000 steps)."""
  steps = np.unique(np.linspace(0, num_steps, 1000).astype(int))
  rates = np.array([float(schedule(int(step))) for step in steps])
  peak = int(np.argmax(rates))
  fig = Figure(figsize=(7, 4), layout='constrained')
  ax = fig.subplots()
  ax.plot(steps, rates)
  ax.plot(steps[peak], rates[peak], 'o')
  ax.annotate(f'peak {rates[peak]:.3g} at step {steps[peak]}', (steps[peak], rates[peak]),
              textcoords='offset points', xytext=(8, -4), fontsize=9)
  ax.set(xlabel='step', ylabel='learning rate', title='Learning-rate schedule')
  return _save(fig, path)


def example_masks(length: int = 8) -> dict[str, tuple[np.ndarray, list[str], list[str]]]:
  """title -> ([L, L] mask, query labels, key labels) of one example row per kind of attention.

  The row holds 6 real tokens then pads; the prefix LM's source is its first 3 tokens; the packed
  row holds two examples (3 and 4 tokens) then pads.
  """
  num_real = 6
  tokens = [f'x{i}' for i in range(1, num_real + 1)] + ['pad'] * (length - num_real)
  targets = [f'y{i}' for i in range(1, length + 1)]
  valid_1xL = jnp.arange(length)[None] < num_real
  segments_1xL = jnp.array([[1] * 3 + [2] * 4 + [0] * (length - 7)])
  packed = ['a1', 'a2', 'a3', 'b1', 'b2', 'b3', 'b4'] + ['pad'] * (length - 7)
  panels = {
      'bert_mlm, original encoder:\npadding': (
          masks.self_attention_mask('bidirectional', valid_1xL), tokens, tokens),
      'gpt_causal, original decoder:\ncausal + padding': (
          masks.self_attention_mask('causal', valid_1xL), tokens, tokens),
      'unilm_prefix:\nprefix (3) + causal + padding': (
          masks.self_attention_mask('prefix', valid_1xL, prefix_len_B=jnp.array([3])), tokens,
          tokens),
      'original cross-attention:\nsource padding': (
          masks.cross_attention_mask(valid_1xL), targets, tokens),
      'packed row (gpt_causal):\ncausal + segments': (
          masks.self_attention_mask('causal', segments_1xL > 0, segment_ids_BxL=segments_1xL),
          packed, packed),
  }
  # Masks of one row are [1, 1, L or 1, L].
  return {title: (np.broadcast_to(np.asarray(mask), (1, 1, length, length))[0, 0], *labels)
          for title, (mask, *labels) in panels.items()}


def plot_masks(path: str, *, length: int = 8) -> str:
  """The attention masks of the four variants (and of packing), built with transformer.masks."""
  panels = example_masks(length)
  fig = Figure(figsize=(3.4 * len(panels), 4.0), layout='constrained')
  for ax, (title, (mask, query_labels, key_labels)) in zip(fig.subplots(1, len(panels)),
                                                            panels.items()):
    ax.imshow(mask, cmap='Blues', vmin=0, vmax=1.3)
    ax.set_title(title, fontsize=10)
    ax.set(xlabel='key', ylabel='query')
    _label_tokens(ax, query_labels, key_labels)
  fig.suptitle('Attention masks (blue: the query may attend to the key)')
  return _save(fig, path)


def write_teaching_plots(out_dir: str, *, schedule: Optional[Callable[[int], float]] = None,
                         num_steps: int = 0, d_model: int = 128) -> list[str]:
  """Positional encodings and masks, plus the learning-rate schedule when one is given."""
  epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
  paths = [plot_positional_encoding(os.path.join(out_dir, 'positional_encoding.png'),
                                    d_model=d_model),
           plot_masks(os.path.join(out_dir, 'masks.png'))]
  if schedule is not None:
    paths.append(plot_learning_rate(schedule, num_steps,
                                    os.path.join(out_dir, 'learning_rate.png')))
  return paths
