r"""Train, evaluate or use a Transformer variant. All logic lives in the `transformer` package.

  python -m launch.main --config=configs/original.py:small --workdir=runs/original_small
  python -m launch.main --config=configs/original.py:small --workdir=runs/original_small \
      --mode=eval --split=test

Override any config field with --config.FIELD=VALUE (e.g. --config.num_train_steps=100).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from transformer import distributed, train, writer

MODES = ('train', 'eval', 'translate', 'generate', 'fill_mask', 'visualize')

config_flags.DEFINE_config_file('config', None, 'A configs/VARIANT.py:SIZE file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and outputs.')
flags.DEFINE_enum('mode', 'train', MODES, 'What to do.')
flags.DEFINE_string('split', 'validation', 'eval: the split to evaluate (validation | test).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  writer.quiet_library_logs()
  distributed.initialize()
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  logging.info('mode=%s workdir=%s config:\n%s', flags.FLAGS.mode, workdir, config)
  if flags.FLAGS.mode == 'train':
    train.train_and_evaluate(config, workdir)
  else:
    raise app.UsageError(f'--mode={flags.FLAGS.mode} is not implemented yet.')


if __name__ == '__main__':
  app.run(main)
