# A walkthrough of the Transformer, run on this repository's own modules.
#
# Render docs/walkthrough.ipynb from this file, from the repo root (runs every cell: about 1.5
# minutes on a 2-core CPU); never edit the .ipynb by hand:
#   pip install -r requirements-docs.txt
#   jupytext --to ipynb docs/walkthrough.py
#   jupyter execute --inplace --kernel_name=python3 docs/walkthrough.ipynb
# Or run it as a plain script: python docs/walkthrough.py (plots are shown, or skipped under
# MPLBACKEND=Agg). Environment: WALKTHROUGH_STEPS (training steps, default 400),
# WALKTHROUGH_DATA_DIR (prepared Multi30k and tokenizer, reused between runs),
# WALKTHROUGH_WORKDIR (checkpoints and metrics; default a fresh temporary folder).
# tests/test_walkthrough.py runs it and checks that docs/walkthrough.ipynb matches this file.

# %% [markdown]
# # The Transformer, step by step
#
# This notebook follows one path through the model of *Attention Is All You Need*:
#
# 1. **Masks**: which token may look at which.
# 2. **Attention**: written by hand in NumPy, then checked against the library's module.
# 3. **Positions**: how a model that sees a set of vectors learns their order.
# 4. **Label smoothing**: the training loss as a KL divergence.
# 5. **Training** a small German → English model on Multi30k for about a minute.
# 6. **Decoding**: greedy, beam search and sampling.
# 7. **Looking inside**: attention heatmaps of the trained model.
#
# Every step imports the library in `transformer/`; nothing here re-implements it except the
# hand-written references that we check it against.

# %%
import json
import os
import pathlib
import sys
import tempfile

# The repository root: the folder holding `transformer/` (the notebook may run from docs/).
ROOT = next(p for p in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents)
            if (p / 'transformer').is_dir())
sys.path.insert(0, str(ROOT))

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from ml_collections import config_flags

from transformer import (attention, data, decode, evaluate, inference, masks, objectives,
                         positions, train, visualize)

np.set_printoptions(precision=4, suppress=True, linewidth=120)
print('JAX devices:', jax.devices())

# %% [markdown]
# ## 1. Masks
#
# Attention lets every query position mix information from key positions. A **mask** says which
# (query, key) pairs are allowed: `True` means "may attend". All four variants of the family use
# the same attention; only their masks differ. The library builds every mask in
# `transformer/masks.py`, with shape `[batch, 1, queries, keys]`.
#
# A decoder must not see the future: key index ≤ query index. Add padding (the last two tokens
# here) and we get the decoder's self-attention mask:

# %%
valid_1x6 = jnp.array([[True, True, True, True, False, False]])  # 4 real tokens, 2 pads
causal_1x1x6x6 = masks.self_attention_mask('causal', valid_1x6)
print(np.asarray(causal_1x1x6x6[0, 0]).astype(int))  # rows: queries, columns: keys

# %% [markdown]
# The same functions give every variant's mask. As truth tables (`#`: may attend, `.`: not),
# for one row of 6 real tokens and 2 pads:

# %%
example_masks = visualize.example_masks(length=8)
for title, (mask_LxL, query_labels, key_labels) in example_masks.items():
  print(title.replace('\n', ' '))
  print('      ' + ' '.join(f'{k:>3}' for k in key_labels))
  for label, row in zip(query_labels, mask_LxL):
    print(f'{label:>5} ' + ' '.join(f'{"#" if allowed else ".":>3}' for allowed in row))
  print()

# %%
fig, axes = plt.subplots(1, len(example_masks), figsize=(3.2 * len(example_masks), 4.0),
                         layout='constrained')
for ax, (title, (mask_LxL, query_labels, key_labels)) in zip(axes, example_masks.items()):
  ax.imshow(mask_LxL, cmap='Blues', vmin=0, vmax=1.3)
  ax.set_title(title, fontsize=9)
  ax.set_xticks(range(len(key_labels)), key_labels, fontsize=7, rotation=90)
  ax.set_yticks(range(len(query_labels)), query_labels, fontsize=7)
  ax.set(xlabel='key', ylabel='query')
fig.suptitle('Attention masks (blue: the query may attend to the key)')
plt.show()

# %% [markdown]
# ## 2. Scaled dot-product attention
#
# $$\mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\left(\frac{QK^\top}{\sqrt{d}} + M\right)V$$
#
# where $M$ is 0 where the mask allows and $-\infty$ elsewhere. Multi-head attention projects
# the input into $H$ heads of width $E = D / H$, attends in each head separately, then merges
# the heads and projects back to width $D$.
#
# First the library's module, `attention.MultiHeadAttention`, with random parameters:

# %%
num_heads, d_model, length = 2, 8, 6
x_1xLxD = jax.random.normal(jax.random.key(0), (1, length, d_model))
mha = attention.MultiHeadAttention(num_heads=num_heads)
mha_params = nn.unbox(mha.init(jax.random.key(1), x_1xLxD, x_1xLxD, causal_1x1x6x6,
                               deterministic=True)['params'])
# The module also records ("sows") its attention weights, for plots like those of section 7.
out_module_1xLxD, sown = mha.apply({'params': mha_params}, x_1xLxD, x_1xLxD, causal_1x1x6x6,
                                   deterministic=True, mutable=['intermediates'])
weights_module_1xHxLxL = sown['intermediates']['attention_weights'][0]
print({name: p['kernel'].shape for name, p in mha_params.items()})


# %% [markdown]
# Now the same computation by hand in NumPy, with the module's four projection matrices:

# %%
def attention_by_hand(x_BxLxD, mask_Bx1xLxL, params, num_heads):
  """softmax(Q K^T / sqrt(E) + M) V per head; returns (output [B, L, D], weights [B, H, L, L])."""
  w = {name: np.asarray(params[name]['kernel']) for name in ('query', 'key', 'value', 'out')}
  x_BxLxD = np.asarray(x_BxLxD)
  batch, length, d_model = x_BxLxD.shape
  head_dim = d_model // num_heads

  def split_heads(y_BxLxD):  # [B, L, D] -> [B, H, L, E]
    return y_BxLxD.reshape(batch, length, num_heads, head_dim).transpose(0, 2, 1, 3)

  q_BxHxLxE, k_BxHxLxE, v_BxHxLxE = (split_heads(x_BxLxD @ w[name])
                                     for name in ('query', 'key', 'value'))
  logits_BxHxLxL = q_BxHxLxE @ k_BxHxLxE.transpose(0, 1, 3, 2) / np.sqrt(head_dim)
  logits_BxHxLxL = np.where(np.asarray(mask_Bx1xLxL), logits_BxHxLxL, -np.inf)
  # Softmax over the keys; subtracting the row maximum changes nothing but avoids overflow.
  exp_BxHxLxL = np.exp(logits_BxHxLxL - logits_BxHxLxL.max(-1, keepdims=True))
  weights_BxHxLxL = exp_BxHxLxL / exp_BxHxLxL.sum(-1, keepdims=True)
  merged_BxLxD = (weights_BxHxLxL @ v_BxHxLxE).transpose(0, 2, 1, 3).reshape(batch, length,
                                                                             d_model)
  return merged_BxLxD @ w['out'], weights_BxHxLxL


out_hand_1xLxD, weights_hand_1xHxLxL = attention_by_hand(x_1xLxD, causal_1x1x6x6, mha_params,
                                                         num_heads)
np.testing.assert_allclose(out_hand_1xLxD, out_module_1xLxD, rtol=1e-5, atol=1e-5)
np.testing.assert_allclose(weights_hand_1xHxLxL, weights_module_1xHxLxL, rtol=1e-5, atol=1e-6)
print('Hand-written attention equals MultiHeadAttention.')
print('Head 0 weights (rows sum to 1; masked keys get 0):')
print(weights_hand_1xHxLxL[0, 0])

# %% [markdown]
# ## 3. Positional encodings
#
# Attention treats its inputs as a set: permute the tokens and the outputs permute the same way.
# The paper adds a fixed **sinusoidal encoding** of each position to the token embeddings:
# $PE(pos, 2i) = \sin(pos / 10000^{2i/D})$ and $PE(pos, 2i+1) = \cos(\cdot)$. Each pair of
# dimensions is a clock at its own frequency, from fast to very slow.

# %%
encoding_LxD = np.asarray(positions.sinusoidal_encoding(jnp.arange(64)[None], 64)[0])
fig, (heatmap_ax, curves_ax) = plt.subplots(1, 2, figsize=(11, 3.6), width_ratios=(3, 2),
                                            layout='constrained')
image = heatmap_ax.imshow(encoding_LxD, aspect='auto', cmap='RdBu', vmin=-1, vmax=1)
heatmap_ax.set(xlabel='dimension', ylabel='position', title='Sinusoidal encoding (D = 64)')
fig.colorbar(image, ax=heatmap_ax)
for dim in (2, 8, 16, 32):
  curves_ax.plot(encoding_LxD[:, dim], label=f'dim {dim}')
curves_ax.set(xlabel='position', title='Some even dimensions (sines)')
curves_ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# **Rotary** positions (`positional='rotary'`, as in Llama) instead rotate each query and key by
# an angle proportional to its position. The score $q \cdot k$ then depends only on the
# *distance* between the two positions:

# %%
q_1x1x1xE, k_1x1x1xE = jax.random.normal(jax.random.key(2), (2, 1, 1, 1, 16))


def rotary_score(query_position: int, key_position: int) -> float:
  rotate = lambda v, pos: positions.rotary(v, jnp.array([[pos]]), theta=10000.0)
  return float(jnp.sum(rotate(q_1x1x1xE, query_position) * rotate(k_1x1x1xE, key_position)))


for query_position, key_position in ((3, 0), (10, 7), (50, 47), (10, 0)):
  score = rotary_score(query_position, key_position)
  print(f'query at {query_position:2d}, key at {key_position:2d} '
        f'(distance {query_position - key_position:2d}): score {score:+.4f}')

# %% [markdown]
# ## 4. Label smoothing is a KL divergence
#
# With label smoothing $\varepsilon$ the target is not one-hot but a soft distribution $q$:
# $1 - \varepsilon$ on the correct token and $\varepsilon / (V - 1)$ on each other one. The
# cross-entropy to the model's prediction $p$ splits into two parts:
#
# $$H(q, p) = -\sum_v q_v \log p_v = \mathrm{KL}(q \,\|\, p) + H(q).$$
#
# $H(q)$ is a constant, so the library reports $\mathrm{KL}(q\|p) = H(q, p) - H(q)$
# (`objectives.smoothed_cross_entropy`): the same gradients, and a perfect model scores 0.

# %%
vocab_size, eps = 6, 0.1
logits_NxV = np.asarray(jax.random.normal(jax.random.key(3), (3, vocab_size)))
targets_N = np.array([2, 0, 5])

# The library: per-token (smoothed loss, unsmoothed NLL, correct), for a batch of one row.
loss_N, nll_N, _ = (np.asarray(x[0]) for x in objectives.smoothed_cross_entropy(
    logits_NxV[None], targets_N[None], eps))

# By hand.
q_NxV = np.full((3, vocab_size), eps / (vocab_size - 1))
q_NxV[np.arange(3), targets_N] = 1 - eps
log_p_NxV = logits_NxV - np.log(np.exp(logits_NxV).sum(-1, keepdims=True))  # log softmax
cross_entropy_N = -(q_NxV * log_p_NxV).sum(-1)
entropy_q_N = -(q_NxV * np.log(q_NxV)).sum(-1)
kl_N = (q_NxV * (np.log(q_NxV) - log_p_NxV)).sum(-1)

np.testing.assert_allclose(cross_entropy_N, kl_N + entropy_q_N, rtol=1e-6)
np.testing.assert_allclose(loss_N, kl_N, rtol=1e-5, atol=1e-6)  # loss = H(q, p) - H(q)
np.testing.assert_allclose(nll_N, -log_p_NxV[np.arange(3), targets_N], rtol=1e-5)
print('library loss   ', loss_N)
print('KL(q || p)     ', kl_N)
print('H(q, p) - H(q) ', cross_entropy_N - entropy_q_N)

# %% [markdown]
# The zero point: when the model predicts exactly $p = q$ (logits $= \log q$), the loss is 0,
# while the plain cross-entropy would still be $H(q) > 0$.

# %%
loss_at_q_N = np.asarray(objectives.smoothed_cross_entropy(
    np.log(q_NxV)[None], targets_N[None], eps)[0][0])
np.testing.assert_allclose(loss_at_q_N, 0.0, atol=1e-5)
print('loss at p = q:', loss_at_q_N, '  H(q):', entropy_q_N)

# %% [markdown]
# ## 5. Training a small translation model
#
# Configs are Python files returning an `ml_collections.ConfigDict`. The command line
# `python -m launch.main --config=configs/original.py:tiny --config.FIELD=VALUE ...` loads
# them through `config_flags`; we load it the same way, with a widened `tiny` model
# (d_model 64, 4 heads) so that a minute of CPU training already gives readable output.

# %%
STEPS = int(os.environ.get('WALKTHROUGH_STEPS', '400'))
DATA_DIR = os.environ.get('WALKTHROUGH_DATA_DIR',
                          os.path.join(tempfile.gettempdir(), 'transformer_walkthrough_data'))
WORKDIR = os.environ.get('WALKTHROUGH_WORKDIR') or tempfile.mkdtemp(prefix='walkthrough_run_')

overrides = dict(
    d_model=64, num_heads=4, d_ff=256, vocab_size=2000, batch_size=32, warmup_steps=200,
    num_train_steps=STEPS, log_every_steps=max(STEPS // 20, 1), eval_every_steps=STEPS,
    checkpoint_every_steps=STEPS,
    bleu_max_sentences=0,  # we decode ourselves in section 6
    num_cpu_devices=-1,  # use the devices JAX already has (this notebook started it above)
    data_dir=DATA_DIR)
override_flags = [f'--config.{field}={value}' for field, value in overrides.items()]
argv = ['walkthrough', f'--config={ROOT}/configs/original.py:tiny', *override_flags]
# Flags of our own (launch/main.py defines its flags globally); sys_argv tells config_flags which
# --config.FIELD overrides to expect, as it reads them from sys.argv in a real command.
flag_values = flags.FlagValues()
config_flags.DEFINE_config_file('config', None, 'A configs/VARIANT.py:SIZE file.',
                                flag_values=flag_values, lock_config=True, sys_argv=argv)
flag_values(argv)
config = flag_values.config
print('python -m launch.main --config=configs/original.py:tiny', ' '.join(override_flags),
      f'--workdir={WORKDIR}')
print({field: config[field] for field in ('variant', 'd_model', 'num_heads', 'num_layers',
                                          'num_decoder_layers', 'label_smoothing')})

# %% [markdown]
# The first run prepares Multi30k (about 29,000 German–English caption pairs) and trains a joint
# sentencepiece vocabulary on both languages; later runs reuse them from `DATA_DIR`.

# %%
tfds.disable_progress_bar()  # keeps the preparation's progress bars out of the notebook
tokenizer = data.get_tokenizer(config)
source, reference = data.load_text_pairs(config, 'validation')[0]
print(source, '->', [tokenizer.decode([i]) for i in tokenizer.encode(source)])

# %% [markdown]
# `train.train_and_evaluate` is what `--mode=train` runs: it writes checkpoints and
# `metrics.jsonl` into the workdir. On a 2-core CPU this takes about a minute.

# %%
_, last_eval = train.train_and_evaluate(config, WORKDIR)
print(f"validation: loss {last_eval['eval_loss']:.3f}, perplexity {last_eval['eval_ppl']:.1f}, "
      f"token accuracy {last_eval['eval_accuracy']:.3f}")

# %%
with open(os.path.join(WORKDIR, 'metrics.jsonl'), encoding='utf-8') as f:
  logged = [record for record in map(json.loads, f) if 'train_loss' in record]
fig, ax = plt.subplots(figsize=(6, 3.5), layout='constrained')
ax.plot([r['step'] for r in logged], [r['train_loss'] for r in logged], marker='.')
ax.set(xlabel='step', ylabel='train loss (KL to the smoothed target)', title='Training')
plt.show()

# %% [markdown]
# ## 6. Decoding: greedy, beam search, sampling
#
# `inference.restore` loads a workdir's latest checkpoint (parameters only) with the model and
# tokenizer of its config, as `--mode=translate` does. The decoder then produces one token at a
# time, reusing a key/value cache:
#
# * **greedy** takes the most likely token at each step;
# * **beam search** keeps the 4 most likely partial translations;
# * **sampling** draws each token from the softmax at temperature 0.7.

# %%
ctx, params, _ = inference.restore(config, WORKDIR)
tokenizer = ctx.tokenizer
pairs = data.load_text_pairs(config, 'validation')[:3]
inputs_BxS, _ = evaluate.encode_sources(tokenizer, [src for src, _ in pairs],
                                        config.max_source_len)
translate = lambda **settings: np.asarray(decode.translate(
    ctx.model, params, jnp.asarray(inputs_BxS), max_len=config.decode_max_len, **settings))
outputs = {
    'greedy': translate(),
    'beam 4': translate(beam_size=4, length_penalty=config.length_penalty),
    'sampled': translate(temperature=0.7, rng=jax.random.key(0)),
}
for i, (src, ref) in enumerate(pairs):
  print(f'source     {src}\nreference  {ref}')
  for name, tokens_BxT in outputs.items():
    print(f'{name:10} {tokenizer.decode(tokens_BxT[i])}')
  print()

# %% [markdown]
# ## 7. Looking inside: attention heatmaps
#
# `visualize.attention_weights` runs the model once on a source sentence and its greedy
# translation (teacher-forced, starting with `<s>`) and returns every layer's attention
# probabilities. Each row is a query; it sums to 1 over the keys.

# %%
source_ids = [int(i) for i in inputs_BxS[0] if i != tokenizer.pad_id]
target_ids = [tokenizer.bos_id] + [int(i) for i in outputs['greedy'][0]
                                   if i not in (tokenizer.pad_id, tokenizer.eos_id)]
weights = visualize.attention_weights(ctx.model, params, jnp.asarray([source_ids]),
                                      jnp.asarray([target_ids]))
piece = lambda i: '<s>' if i == tokenizer.bos_id else tokenizer.decode([i])
source_labels, target_labels = [piece(i) for i in source_ids], [piece(i) for i in target_ids]
print({name: w.shape for name, w in weights.items()})  # [layers, heads, queries, keys]


def plot_heads(weights_HxQxK, title, query_labels, key_labels):
  """Draws one layer's heads side by side, on a shared 0..1 scale."""
  num_heads = weights_HxQxK.shape[0]
  fig, axes = plt.subplots(1, num_heads, figsize=(3.3 * num_heads, 3.8), layout='constrained')
  for head, ax in enumerate(axes):
    image = ax.imshow(weights_HxQxK[head], vmin=0.0, vmax=1.0, cmap='viridis')
    ax.set_title(f'head {head}', fontsize=9)
    ax.set_xticks(range(len(key_labels)), key_labels, fontsize=7, rotation=90)
    ax.set_yticks(range(len(query_labels)), query_labels, fontsize=7)
  fig.colorbar(image, ax=axes, shrink=0.7, label='attention probability')
  fig.suptitle(title)


# %% [markdown]
# Encoder self-attention in the last layer: each source token looks at the whole sentence.

# %%
last = config.num_layers - 1
plot_heads(weights['encoder/self_attention'][last], f'Encoder self-attention, layer {last}',
           source_labels, source_labels)
plt.show()

# %% [markdown]
# Decoder cross-attention in the last layer: which source tokens each target position reads
# while predicting the next word. After a short training the alignment is rough; train longer
# (`WALKTHROUGH_STEPS`) to see it sharpen.

# %%
last = config.num_decoder_layers - 1
plot_heads(weights['decoder/cross_attention'][last], f'Decoder cross-attention, layer {last}',
           target_labels, source_labels)
plt.show()

# %% [markdown]
# ## Where to go next
#
# * `python -m launch.main --config=configs/original.py:small --workdir=runs/small` trains the
#   CPU recipe for real; `--mode=visualize` writes these plots for every layer.
# * The other variants (`configs/bert_mlm.py`, `gpt_causal.py`, `unilm_prefix.py`) use the same
#   modules with the other masks of section 1.
