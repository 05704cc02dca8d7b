"""Defaults shared by every variant; each variant file overrides what differs.

One flat ConfigDict: `--config.field=value` overrides any field. Fields whose default is "unset" use
`placeholder(type)` so they can still be set from the command line.
"""

import os

import ml_collections
from ml_collections import config_dict

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.normpath(os.path.join(REPO_ROOT, '..', 'shared', 'data'))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  # --- Variant -------------------------------------------------------------------------------
  c.variant = 'original'  # original | bert_mlm | gpt_causal | unilm_prefix (set by the file).

  # --- Model ---------------------------------------------------------------------------------
  c.d_model = 512  # Width of the residual stream.
  c.num_heads = 8  # Attention heads; d_model must divide evenly.
  c.num_kv_heads = config_dict.placeholder(int)  # Key/value heads: grouped-query attention
  # (1 = multi-query; unset = num_heads, the paper's multi-head attention).
  c.num_layers = 6  # Layers of the encoder (or of the single stack).
  c.num_decoder_layers = 6  # Layers of the decoder (encoder-decoder only).
  c.d_ff = 2048  # Hidden units of the position-wise feed-forward network.
  c.ffn = 'dense'  # dense: act(x W_i) W_o (the paper) | gated: (act(x W_gate) * x W_i) W_o
  # (GEGLU with gelu, SwiGLU with silu; d_ff is the gated width).
  c.ffn_bias = True  # Biases in the feed-forward layers (T5, Llama: none).
  c.activation = 'relu'  # relu (the paper) | gelu (exact, erf) | gelu_tanh (its tanh form) | silu.
  c.dropout_rate = 0.1  # Dropout on the embeddings and on every sublayer's output before its add.
  c.attention_dropout_rate = 0.0  # Dropout on attention probabilities.
  c.pre_ln = False  # False: post-LN as in the paper; True: pre-LN with a final norm.
  c.norm = 'layernorm'  # Every norm of the model: layernorm (the paper) | rmsnorm (T5, Llama).
  c.norm_epsilon = 1e-6  # Epsilon of every norm (PyTorch's LayerNorm default is 1e-5).
  c.qk_norm = False  # Normalise each head's queries and keys (config.norm) before the dot product.
  c.positional = 'sinusoidal'  # sinusoidal (the paper) | learned | rotary | relative_bias (T5) |
  # alibi (see transformer/positions.py).
  c.sinusoidal_layout = 'interleaved'  # interleaved: sin, cos, sin, ... (the paper's formula) |
  # halves: all sines, then all cosines (Marian, tensor2tensor).
  c.rope_theta = 10000.0  # positional=rotary: the base of the rotation frequencies.
  c.relative_buckets = 32  # positional=relative_bias: distance buckets (T5).
  c.relative_max_distance = 128  # positional=relative_bias: distances beyond share a bucket.
  c.max_len = 256  # Longest sequence the model accepts (learned positions, decode caches).
  c.share_embeddings = True  # Encoder and decoder share one token embedding (joint vocabulary).
  c.tie_output = True  # Output projection is the transposed token embedding.
  c.num_token_types = 0  # >0 adds segment (token-type) embeddings (bert_mlm, unilm_prefix).
  c.attention_bias = False  # Biases on the query/key/value/output projections (the paper: none).
  c.scale_attention = True  # Attention logits / sqrt(head width) (the paper; T5: no).
  c.scale_embeddings = True  # Token embeddings x sqrt(d_model) (the paper; BERT and GPT-2: no).
  c.embedding_norm = False  # A norm on the summed embeddings, before dropout (BERT).
  c.embedding_dim = config_dict.placeholder(int)  # ALBERT's factorised embedding: V x E tables
  # and an E -> d_model projection (unset = d_model, no projection).
  c.share_layers = False  # ALBERT: one set of layer parameters used at every depth of a stack.
  c.attention_kind = 'full'  # Self-attention: full (the paper) | local (a sliding window,
  # computed in blocks: memory L x window, not L^2) | strided (Sparse Transformer: the window
  # plus every window-th key back, memory L x (window + L / window)) | low_rank (Linformer;
  # bidirectional, no packing) | lsh (Reformer: shared-QK, hashed into buckets; no cached
  # decoding, no logit-bias positions). See transformer/attention_kinds.py.
  c.attention_window = 128  # local: keys fewer than this many positions away; strided: that
  # window and the stride; lsh: the chunk (keys fewer than this many places away in its sort).
  c.num_global_tokens = 0  # attention_kind=local only: Longformer's global tokens, the first
  # this many of each row (e.g. [CLS]), which read every key and which every query reads, the
  # mask still applying (memory L x (window + this)). Not with packing; decoding then keeps a
  # cache as long as the decode instead of a ring of the window.
  c.low_rank_dim = 64  # attention_kind=low_rank: rows the keys and values are projected to.
  c.lsh_buckets = 8  # attention_kind=lsh: hash buckets per round (even: argmax over [xR; -xR]).
  c.lsh_rounds = 2  # attention_kind=lsh: hashing rounds, joined in one softmax.
  c.memory_length = 0  # Transformer-XL (gpt_causal): each layer also attends to its inputs at
  # the last memory_length tokens of the row's previous segment (no gradient through them).
  # Rows then run through the corpus as batch_size continuous streams, in training and in
  # evaluation; needs relative positions (rotary | relative_bias | alibi) and full attention.
  c.logits_bias = False  # A learned bias on the output logits (Marian's final_logits_bias).
  c.output_rsqrt_scale = False  # Hidden states x d_model^-0.5 before the output projection (T5).
  c.dtype = 'auto'  # Matrix products' input dtype: float32 | bfloat16 (float32 sums; everything
  # else, parameters included, float32) | auto: bfloat16 where its matmuls measure 1.5x float32's
  # (transformer/precision.py).
  c.attention_impl = 'xla'  # xla: attention as explicit einsums (weights for plots) | cudnn:
  # jax.nn.dot_product_attention's cuDNN kernel (GPU) | auto: the best kernel the backend has.
  # cudnn and auto apply no attention dropout (attention_dropout_rate must be 0).
  c.remat = 'none'  # Recompute each block's activations in the backward pass instead of storing
  # them: none | full | dots | dots_no_batch (what is kept; see transformer/layers.py).
  c.scan_layers = False  # Compile one layer scanned over depth (parameters stacked on a leading
  # axis) instead of each layer: compile time independent of depth, for deep models.

  # --- Data ----------------------------------------------------------------------------------
  c.dataset = 'multi30k'  # multi30k | wmt14 (the paper's WMT14 English-German) |
  # tiny_shakespeare | text (your own files, see text_* below).
  c.raw_data_dir = SHARED_DATA if os.path.isdir(SHARED_DATA) else config_dict.placeholder(str)
  # ^ Raw corpora; unset and absent locally -> download from the public source.
  c.data_dir = os.path.join(REPO_ROOT, 'data')  # Prepared array_record data and tokenizers.
  c.source_lang = 'de'  # Translation direction: source language.
  c.target_lang = 'en'  # Translation direction: target language.
  c.text_train_files = config_dict.placeholder(str)  # dataset=text: comma-separated train files
  # (one example per line; for pairs give source and target files separated by ':').
  c.text_eval_files = config_dict.placeholder(str)  # dataset=text: the same for validation.
  c.tokenizer = 'sentencepiece'  # sentencepiece | char (character vocabulary) | huggingface
  # (a converted model's tokenizer.json, in hf_tokenizer_dir).
  c.hf_tokenizer_dir = config_dict.placeholder(str)  # tokenizer=huggingface: its folder.
  c.vocab_size = 8000  # Sentencepiece vocabulary size (joint source+target for translation).
  c.spm_model_type = 'bpe'  # Sentencepiece algorithm: bpe | unigram.
  c.subword_split_rate = 0.0  # Training only: each token is split into the two pieces BPE merged
  # to make it with this probability, and each half again (subword regularisation like
  # BPE-dropout's; needs spm_model_type=bpe, not gpt_causal's windows). 0: off.
  c.max_source_len = 64  # Source tokens kept (longer examples are filtered and counted).
  c.max_target_len = 64  # Target tokens kept, before bos/eos.
  c.block_size = 128  # Sequence length of language-model examples (gpt_causal, bert_mlm).
  c.packing = False  # Pack several examples per row (segment ids + positions) instead of padding
  # (original, unilm_prefix, bert_mlm).
  c.mlm_probability = 0.15  # Fraction of non-special tokens selected for the MLM loss.
  c.mlm_max_predictions = 20  # At most this many selected tokens per sequence.
  c.shuffle_buffer_seed = 0  # Seed of the data order (independent of the model seed).
  c.worker_count = 0  # grain worker processes (0 = in the main process).
  c.prepare_workers = 0  # Processes tokenizing a split the first time it is read (0: one per
  # core for splits of 200k records or more, else this process; see transformer/data/prepared.py).
  c.lm_sides = config_dict.placeholder(str)  # LM variants on parallel data: comma-separated sides
  # to read (multi30k, wmt14: de,en; text: source,target); unset = all sides.

  # --- Training ------------------------------------------------------------------------------
  c.seed = 0  # Model initialisation and dropout seed.
  c.batch_size = 64  # Global batch, in examples (sequences), summed over all processes.
  c.num_train_steps = 1000  # Optimizer updates.
  c.grad_accum_steps = 1  # Micro-batches per update; the schedule advances once per update.
  c.optimizer = 'adamw'  # adamw (the paper's Adam plus optional decoupled weight decay) |
  # adafactor (T5's factored second moments) | lion (sign of momentum; use a ~3-10x lower rate).
  c.learning_rate = 1.0  # Peak rate; for the 'rsqrt' schedule a multiplier of d_model^-0.5.
  c.schedule = 'rsqrt'  # rsqrt (paper: d^-0.5 min(s^-0.5, s w^-1.5)) | cosine | constant.
  c.warmup_steps = 4000  # Linear warmup steps.
  c.b1 = 0.9  # Adam beta1.
  c.b2 = 0.98  # Adam beta2 (paper).
  c.eps = 1e-9  # Adam epsilon (paper).
  c.weight_decay = 0.0  # Decoupled weight decay.
  c.grad_clip_norm = 1.0  # Global-norm clipping (0 disables).
  c.label_smoothing = 0.1  # Label smoothing epsilon (paper: 0.1).
  c.on_nonfinite = 'stop'  # Non-finite loss or gradients: stop | skip (drop the update, count it).

  # --- Mesh ----------------------------------------------------------------------------------
  c.mesh_data = -1  # Devices on the data axis (-1 = all devices not used by other axes).
  c.mesh_fsdp = 1  # Devices on the fsdp axis (parameters and optimizer state sharded).
  c.mesh_tensor = 1  # Devices on the tensor axis (attention heads and feed-forward units split).
  c.num_cpu_devices = 2  # CPU backend: split the host into this many JAX devices (-1 = one). Two
  # run data-parallel, one per core of a 2-core machine: a small model cannot keep two cores busy
  # inside one device (gpt_causal:small 31.7 -> 22.4 ms per step). Ignored on GPU and TPU.
  c.keep_host_memory = True  # CPU backend: glibc malloc keeps freed memory for reuse (one arena,
  # no mmap, no trim) instead of faulting fresh pages in at every step: original:small 530 -> 400
  # ms/step. The process keeps its peak heap. Not applied on GPU and TPU. See
  # distributed.keep_freed_memory.

  # --- Evaluation, logging, checkpoints -------------------------------------------------------
  c.log_every_steps = 50  # Train metrics to metrics.jsonl / TensorBoard / console.
  c.peak_flops = config_dict.placeholder(float)  # Peak FLOP/s for MFU (unset = measured at start).
  c.eval_every_steps = 500  # Validation (and BLEU where it applies); also at the end.
  c.eval_batch_size = 64  # Global eval batch.
  c.decode_batch_size = config_dict.placeholder(int)  # Sentences per batch that translation
  # decodes (translate, eval, select, validation BLEU); unset = eval_batch_size, but at most 16 per
  # data-parallel device on the CPU backend, where smaller batches decode faster (see
  # evaluate.decode_batch_size).
  c.max_eval_batches = config_dict.placeholder(int)  # Cap validation batches (unset = whole split).
  c.bleu_max_sentences = 200  # Validation sentences decoded for BLEU during training (0 = skip).
  c.decode_max_len = 64  # Longest generated continuation.
  c.beam_size = 4  # Beam width for --mode=translate/eval (1 = greedy).
  c.translate_max_ratio = 2.0  # Translation outputs end after this many times the source
  # batch's length (padded to a multiple of 16), or after decode_max_len tokens if sooner.
  c.length_penalty = 0.6  # Beam length penalty alpha: ((5 + len) / 6) ** alpha.
  c.temperature = 1.0  # Sampling temperature (0 = greedy).
  c.top_k = 0  # Sample from the k most likely tokens (0 = all).
  c.top_p = 1.0  # Nucleus sampling mass (1 = all).
  c.checkpoint_every_steps = 500  # Asynchronous checkpoint period; also at the end.
  c.max_checkpoints_to_keep = 3  # Most recent checkpoints kept (plus the best).
  c.average_last_checkpoints = 0  # N >= 2: a finished run also saves the mean of the parameters
  # of its last N checkpoints, as the paper evaluates (--checkpoint=averaged); 0 = off.
  c.best_metric = 'eval_loss'  # Validation metric that picks the best checkpoint (lower = better).
  return c


def make_config(variant: str, overrides: dict, sizes: dict, size: str) -> ml_collections.ConfigDict:
  """base_config() + the variant's overrides + the named size, checked and locked."""
  if size not in sizes:
    raise ValueError(f'Unknown size {size!r} for configs/{variant}.py; valid sizes: '
                     f'{", ".join(sizes)} (use --config=configs/{variant}.py:SIZE).')
  c = base_config()
  c.variant = variant
  c.update(overrides)
  c.update(sizes[size])
  c.size = size  # The named size this config was made from (for logs and tables).
  c.lock()
  return c


# Sizes for tests and smoke runs: a few seconds on one CPU.
TINY = dict(d_model=32, num_heads=2, num_layers=2, num_decoder_layers=2, d_ff=64, max_len=64,
            vocab_size=500, max_source_len=24, max_target_len=24, block_size=32, batch_size=16,
            eval_batch_size=32, num_train_steps=40, warmup_steps=10, log_every_steps=10,
            eval_every_steps=40, checkpoint_every_steps=20, max_eval_batches=2,
            bleu_max_sentences=16, decode_max_len=24, mlm_max_predictions=5,
            dtype='float32')  # the same numbers on every machine
# The paper's base model.
BASE = dict(d_model=512, num_heads=8, num_layers=6, num_decoder_layers=6, d_ff=2048,
            dropout_rate=0.1, warmup_steps=4000, num_train_steps=100_000)
