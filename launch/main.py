r"""Train, evaluate or use a Transformer variant. All logic lives in the `transformer` package.

  python -m launch.main --config=configs/original.py:small --workdir=runs/original_small
  python -m launch.main --config=configs/original.py:small --workdir=runs/original_small \
      --mode=eval --split=test
  echo "Ein Hund läuft." | python -m launch.main --config=configs/original.py:small \
      --workdir=runs/original_small --mode=translate

Override any config field with --config.FIELD=VALUE (e.g. --config.num_train_steps=100).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from transformer import distributed, inference, train, writer

MODES = ('train', 'eval', 'translate', 'generate', 'fill_mask', 'visualize')

config_flags.DEFINE_config_file('config', None, 'A configs/VARIANT.py:SIZE file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and outputs.')
flags.DEFINE_enum('mode', 'train', MODES, 'What to do.')
flags.DEFINE_string('checkpoint', 'latest',
                    'Non-train modes: which checkpoint of the workdir to load: latest | best | '
                    'a step number | comma-separated steps, whose parameters are averaged.')
flags.DEFINE_string('split', 'validation', 'eval: the split to evaluate (validation | test).')
flags.DEFINE_string('input', None, 'translate: a file of source lines (default: stdin).')
flags.DEFINE_string('output', None, 'translate: where to write translations (default: stdout).')
flags.DEFINE_string('prompt', '\n', 'generate: the text to continue.')
flags.DEFINE_integer('num_samples', 3, 'generate: how many continuations.')
flags.DEFINE_string('text', None, 'fill_mask: text with <mask> tokens; visualize: a sentence.')
flags.DEFINE_integer('top_k', 5, 'fill_mask: predictions shown per mask.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  writer.quiet_library_logs()
  f = flags.FLAGS
  distributed.initialize(f.config.num_cpu_devices, f.config.keep_host_memory)
  if f.checkpoint not in ('latest', 'best') and not all(
      step.isdigit() for step in f.checkpoint.split(',')):
    raise app.UsageError(f'--checkpoint={f.checkpoint}: expected latest, best, a step number or '
                         'comma-separated step numbers.')
  config, workdir = f.config, f.workdir
  logging.info('mode=%s workdir=%s config:\n%s', f.mode, workdir, config)
  if f.mode == 'train':
    train.train_and_evaluate(config, workdir)
  elif f.mode == 'eval':
    inference.run_eval(config, workdir, f.split, f.checkpoint)
  elif f.mode == 'translate':
    inference.run_translate(config, workdir, f.input, f.output, f.checkpoint)
  elif f.mode == 'generate':
    inference.run_generate(config, workdir, f.prompt, f.num_samples, f.checkpoint)
  elif f.mode == 'fill_mask':
    inference.run_fill_mask(config, workdir, f.text or '', f.top_k, f.checkpoint)
  elif f.mode == 'visualize':
    inference.run_visualize(config, workdir, f.text, f.checkpoint)


if __name__ == '__main__':
  app.run(main)
