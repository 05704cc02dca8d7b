r"""original: the encoder-decoder Transformer of "Attention Is All You Need", for translation.

Usage: --config=configs/original.py:SIZE with SIZE in tiny | small | small_paper | base | big.

The paper's base run on WMT14 English-German (the statmt archives in DIR/wmt14/), at about the
paper's batch size (208 packed rows of 128 tokens a side) and vocabulary (37k); see docs/data.md
for the data and what the run costs:
  python -m launch.main --config=configs/original.py:base --config.dataset=wmt14 \
      --config.raw_data_dir=DIR --config.vocab_size=37000 --config.packing=True \
      --config.batch_size=208 --config.max_source_len=128 --config.max_target_len=128 \
      --workdir=runs/wmt14_base
"""

from configs import common

# The paper's recipe (post-LN, dropout 0.1, its rsqrt schedule) at CPU size: ~7.6 M parameters
# with the joint 8k vocabulary. Rows of 64 tokens packed with ~4 sentence pairs each (padding
# would waste ~3/4 of the compute on Multi30k). The baseline of the ablation sweeps.
SMALL_PAPER = dict(d_model=256, num_heads=4, num_layers=3, num_decoder_layers=3, d_ff=1024,
                   packing=True, batch_size=32, learning_rate=0.5, warmup_steps=300,
                   num_train_steps=4200, eval_every_steps=600, checkpoint_every_steps=600,
                   log_every_steps=25, bleu_max_sentences=1014)

SIZES = dict(
    tiny=common.TINY,
    # The same model trained for time-to-BLEU, chosen on validation (docs/results.md): pre-LN,
    # dropout 0.2 and a cosine decay learn in 3,000 steps what the paper's recipe does in 4,200,
    # and rotary positions (no parameters) learn faster still; training saves the mean of its
    # last four checkpoints, as the paper evaluates.
    small=dict(SMALL_PAPER, pre_ln=True, positional='rotary', dropout_rate=0.2, schedule='cosine',
               learning_rate=2e-3, num_train_steps=3000, eval_every_steps=1000,
               checkpoint_every_steps=250, max_checkpoints_to_keep=4,
               average_last_checkpoints=4),
    small_paper=SMALL_PAPER,
    base=common.BASE,
    # The paper's big model (213 M parameters with a 37k vocabulary).
    big=dict(common.BASE, d_model=1024, num_heads=16, d_ff=4096, dropout_rate=0.3),
)


def get_config(size: str = 'small'):
  return common.make_config('original', {}, SIZES, size)
