r"""Train, evaluate or use a Transformer variant. All logic lives in the `transformer` package.

  python -m launch.main --config=configs/original.py:small --workdir=runs/original_small
  python -m launch.main --config=configs/original.py:small --workdir=runs/original_small \
      --mode=eval --split=test
  echo "Ein Hund läuft." | python -m launch.main --config=configs/original.py:small \
      --workdir=runs/original_small --mode=translate

--mode=select compares checkpoints and decoding settings on the validation split and records the
best; the modes that load a model then use it unless --checkpoint or --config.beam_size /
--config.length_penalty say otherwise.

Override any config field with --config.FIELD=VALUE (e.g. --config.num_train_steps=100).

A mistake in the flags, the config or the workdir prints one line saying what to do and exits 1,
before anything is written (--verbose, or TRANSFORMER_TRACEBACK=1, adds the Python traceback).
Ctrl-C in training finishes the step, saves it and exits 130; a second Ctrl-C stops at once.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from transformer import config_checks, distributed, errors, inference, selection, train, writer

MODES = ('train', 'eval', 'translate', 'generate', 'fill_mask', 'visualize', 'select')
EXIT_INTERRUPTED = 130  # the shell's code for a process stopped by Ctrl-C (128 + SIGINT)

config_flags.DEFINE_config_file('config', None, 'A configs/VARIANT.py:SIZE file.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and outputs.')
flags.DEFINE_enum('mode', 'train', MODES, 'What to do.')
flags.DEFINE_string('checkpoint', None,
                    'Modes that load a model: which checkpoint of the workdir: latest | best | '
                    'averaged (saved by training, see config.average_last_checkpoints) | a step '
                    'number | comma-separated steps, whose parameters are averaged. Default: the '
                    'one --mode=select chose, else latest.')
flags.DEFINE_string('split', 'validation', 'eval: the split to evaluate (validation | test); '
                    'select reads validation only.')
flags.DEFINE_string('input', None, 'translate: a file of source lines (default: stdin).')
flags.DEFINE_string('output', None, 'translate: where to write translations (default: stdout).')
flags.DEFINE_string('prompt', '\n', 'generate: the text to continue.')
flags.DEFINE_integer('num_samples', 3, 'generate: how many continuations.')
flags.DEFINE_string('text', None, 'fill_mask: text with <mask> tokens; visualize: a sentence.')
flags.DEFINE_integer('top_k', 5, 'fill_mask: predictions shown per mask.')
flags.DEFINE_bool('force_unlock', False, 'train: take over the lock of the workdir (run.lock) from '
                  'the run it names, e.g. one on another host that is gone.')
flags.DEFINE_list('allow_config_change', [], 'train, resuming: config fields that may differ from '
                  'the workdir\'s config.json (recorded in config_history.jsonl).')
flags.DEFINE_string('compilation_cache_dir', '~/.cache/transformer/xla',
                    'Where compiled programs are kept between runs, so that a command run again '
                    '(a resumed or repeated run, eval or translate after training) skips most of '
                    'its compilation; empty: off. JAX_COMPILATION_CACHE_DIR, where set, wins.')
flags.DEFINE_bool('verbose', False, 'Show the Python traceback of user errors too (bad flags or '
                  'config values, missing files, a busy workdir). Env: TRANSFORMER_TRACEBACK=1.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  writer.quiet_library_logs()
  f = flags.FLAGS
  config, workdir = f.config, f.workdir
  if f.checkpoint not in (None, 'latest', 'best', 'averaged') and not all(
      step.isdigit() for step in f.checkpoint.split(',')):
    raise errors.ConfigError(f'--checkpoint={f.checkpoint}: expected latest, best, averaged, a '
                             'step number or comma-separated step numbers.')
  if f.mode == 'select' and f.split != selection.SPLIT:
    raise errors.ConfigError(f'--mode=select chooses on the {selection.SPLIT} split only: a choice '
                             f'made on --split={f.split} would flatter its score there.')
  config_checks.check(config, f.mode)  # before JAX starts: a mistake costs nothing
  config_checks.check_fields(config, f.allow_config_change, '--allow_config_change')
  distributed.initialize(config.num_cpu_devices, config.keep_host_memory)
  distributed.keep_compiled_programs(f.compilation_cache_dir)
  config_checks.check_mesh(config, f.mode)  # before anything is written
  which = f.checkpoint
  if f.mode not in ('train', 'select'):
    config, which = selection.resolve(config, workdir, f.checkpoint,
                                      config_flags.get_override_values(f['config']))
  logging.info('mode=%s workdir=%s', f.mode, workdir)
  if f.mode != 'train':  # training logs it once the workdir is its own
    logging.info('config:\n%s', config)
  if f.mode == 'train':
    train.train_and_evaluate(config, workdir, force_unlock=f.force_unlock,
                             allow_config_change=f.allow_config_change)
  elif f.mode == 'eval':
    inference.run_eval(config, workdir, f.split, which)
  elif f.mode == 'translate':
    inference.run_translate(config, workdir, f.input, f.output, which)
  elif f.mode == 'generate':
    inference.run_generate(config, workdir, f.prompt, f.num_samples, which)
  elif f.mode == 'fill_mask':
    inference.run_fill_mask(config, workdir, f.text or '', f.top_k, which)
  elif f.mode == 'visualize':
    inference.run_visualize(config, workdir, f.text, which)
  elif f.mode == 'select':
    selection.run_select(config, workdir)


def _tracebacks_wanted(argv) -> bool:
  """--verbose is read from argv as well: a failed parse may not have reached it."""
  return (os.environ.get('TRANSFORMER_TRACEBACK', '') not in ('', '0') or '--verbose' in argv
          or (flags.FLAGS.is_parsed() and flags.FLAGS.verbose))


def _one_line(error: Exception) -> str:
  """The message of a flag error, without the traceback that ml_collections puts inside it (a
  config file that raised) or around it (an unknown --config.FIELD, three chained tracebacks)."""
  while error.args and isinstance(error.args[0], Exception):
    error = error.args[0]  # AttributeError(KeyError('field\nDid you mean ...?'))
  text = str(error.args[0]) if error.args else str(error)
  if isinstance(error, KeyError):  # "'field'\nDid you mean ...?"
    field, _, hint = text.partition('\n')
    text = f'Unknown config field {field}. {hint}'
  if 'Traceback (most recent call last)' in text:
    head, _, trace = text.partition('Traceback (most recent call last)')
    text = f'{head.strip()} {trace.strip().splitlines()[-1]}'
  return ' '.join(text.split())


def _parse_flags(argv):
  """absl's parser, every error of which is reported in one line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    if _tracebacks_wanted(argv):
      raise
    sys.exit(f'Error: {_one_line(e)}')


def _main_reporting_user_errors(argv):
  try:
    main(argv)
  except errors.UserError as e:
    if _tracebacks_wanted(argv):
      raise
    sys.exit(f'Error: {e}')
  except distributed.Interrupted:  # saved; its log line says where
    sys.exit(EXIT_INTERRUPTED)
  except KeyboardInterrupt:
    print('Interrupted: stopped at once; nothing was saved since the last checkpoint.',
          file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)


if __name__ == '__main__':
  app.run(_main_reporting_user_errors, flags_parser=_parse_flags)
