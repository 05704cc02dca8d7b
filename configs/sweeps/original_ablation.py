"""original:small, one factor at a time: each run changes one choice of the paper's recipe.

  python -m launch.sweep --sweep=configs/sweeps/original_ablation.py --workdir=runs/ablation

Shortened so that the five runs take about 25 minutes on a 2-core CPU: 120 steps (about 15,000
sentence pairs, half an epoch) with a 100-step warmup; validation loss on the whole split and
greedy BLEU on its first 500 sentences. Longer runs: --set=num_train_steps=1400 (recipe 1).
"""


def get_sweep():
  return dict(
      config='configs/original.py:small',
      overrides=dict(num_train_steps=120, warmup_steps=100, eval_every_steps=120,
                     checkpoint_every_steps=120, log_every_steps=20, bleu_max_sentences=500),
      runs=[
          ('baseline', {}),
          ('pre_ln', {'pre_ln': True}),
          ('no_label_smoothing', {'label_smoothing': 0.0}),
          ('learned_positions', {'positional': 'learned'}),
          ('untied_embeddings', {'share_embeddings': False, 'tie_output': False}),
      ],
      seeds=[0],
  )
