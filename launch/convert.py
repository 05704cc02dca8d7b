r"""Hugging Face checkpoints in and out (MarianMTModel, BertForMaskedLM, GPT2LMHeadModel).

  python -m launch.convert --from_hf=DIR --workdir=runs/gpt2       # a local HF folder -> workdir
  python -m launch.main --config=configs/workdir.py:runs/gpt2 --workdir=runs/gpt2 --mode=generate
  python -m launch.convert --workdir=runs/gpt2 --to_hf=exported/   # workdir -> HF folder

--from_hf reads config.json, model.safetensors (or pytorch_model.bin, as data only) and the
tokenizer files of DIR, offline, and writes a step-0 checkpoint, config.json and hf_tokenizer/
into the workdir; every --mode of launch.main then works with --config=configs/workdir.py:WORKDIR,
and training from it fine-tunes. --to_hf writes the workdir's latest (or --checkpoint) parameters
so that transformers' from_pretrained(DIR) loads them.
"""

import sys

from absl import app, flags, logging

from configs import bert_mlm, gpt_causal, original, workdir as workdir_config
from transformer import writer
from transformer.interop import huggingface
from transformer.interop.rules import UnsupportedConfigError

CONFIGS = {'original': original, 'bert_mlm': bert_mlm, 'gpt_causal': gpt_causal}

flags.DEFINE_string('from_hf', None, 'A local Hugging Face model folder to convert.')
flags.DEFINE_string('to_hf', None, 'Export the workdir into this folder.')
flags.DEFINE_string('workdir', None, 'The workdir to write (--from_hf) or to read (--to_hf).')
flags.DEFINE_string('checkpoint', 'latest', '--to_hf: latest or a step number.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  if bool(f.from_hf) == bool(f.to_hf):
    raise app.UsageError('Give exactly one of --from_hf=DIR and --to_hf=DIR.')
  if f.checkpoint != 'latest' and not f.checkpoint.isdigit():
    raise app.UsageError(f'--checkpoint={f.checkpoint}: expected latest or a step number.')
  writer.quiet_library_logs()
  try:
    if f.from_hf:
      config, _ = huggingface.import_folder(
          f.from_hf, f.workdir, lambda variant: CONFIGS[variant].get_config('small'))
      print(f'Wrote {f.workdir} ({config.variant}). Use it with: python -m launch.main '
            f'--config=configs/workdir.py:{f.workdir} --workdir={f.workdir} --mode=...')
    else:
      config = workdir_config.get_config(f.workdir)
      huggingface.export_workdir(config, f.workdir, f.to_hf, f.checkpoint)
      print(f'Wrote {f.to_hf}: transformers loads it with from_pretrained({f.to_hf!r}).')
  except (UnsupportedConfigError, FileNotFoundError, FileExistsError, ValueError) as e:
    logging.debug('conversion failed', exc_info=True)
    sys.exit(f'launch.convert: {e}')


if __name__ == '__main__':
  app.run(main)
