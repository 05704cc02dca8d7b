"""The search that made original:small: the paper's recipe (original:small_paper) in 3,000 steps
instead of 4,200, with more dropout against Multi30k's overfitting, pre-LN (which learns faster
early) and a cosine decay of the rate, compared on validation.

  python -m launch.sweep --sweep=configs/sweeps/original_recipe_v2.py --workdir=runs/recipe_v2

The paper's dropout (0.1) overfits Multi30k's 29,000 pairs after about 14 epochs (3,000 steps).
Each run trains 3,000 steps, keeps its last four checkpoints (250 steps apart) and saves their
mean; the runs are compared on validation (docs/results.md), and the winner's --mode=select
chooses its checkpoint and decoding, on validation too.
"""


def get_sweep():
  return dict(
      config='configs/original.py:small_paper',
      overrides=dict(num_train_steps=3000, eval_every_steps=1000, checkpoint_every_steps=250,
                     max_checkpoints_to_keep=4, average_last_checkpoints=4),
      runs=[
          ('dropout_0.2', {'dropout_rate': 0.2}),
          ('dropout_0.3', {'dropout_rate': 0.3}),
          ('dropout_0.2_pre_ln', {'dropout_rate': 0.2, 'pre_ln': True}),
          # Pre-LN's rate: cosine decay to a tenth of about the same peak (rsqrt's 0.5 gives
          # 1.8e-3 at step 300).
          ('dropout_0.2_pre_ln_cosine', {'dropout_rate': 0.2, 'pre_ln': True,
                                         'schedule': 'cosine', 'learning_rate': 2e-3}),
      ],
      seeds=[0],
  )
