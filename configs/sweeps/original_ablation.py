"""original:small_paper, one factor at a time: each run changes one choice of the paper's recipe.

  python -m launch.sweep --sweep=configs/sweeps/original_ablation.py --workdir=runs/ablation

Shortened so that the ten runs (five choices, two seeds) take about 30 minutes on a fast 2-core
CPU: 240 steps (about 30,000 sentence pairs, one epoch) with a 200-step warmup; validation loss on
the whole split and greedy BLEU on its first 500 sentences. Recipe 1's length:
--set=num_train_steps=4200 --set=warmup_steps=300.
"""


def get_sweep():
  return dict(
      config='configs/original.py:small_paper',
      overrides=dict(num_train_steps=240, warmup_steps=200, eval_every_steps=240,
                     checkpoint_every_steps=240, log_every_steps=20, bleu_max_sentences=500),
      runs=[
          ('baseline', {}),
          ('pre_ln', {'pre_ln': True}),
          ('no_label_smoothing', {'label_smoothing': 0.0}),
          ('learned_positions', {'positional': 'learned'}),
          ('untied_embeddings', {'share_embeddings': False, 'tie_output': False}),
      ],
      seeds=[0, 1],
  )
