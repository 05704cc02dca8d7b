"""Choosing a workdir's checkpoint and decoding setting on the validation split (--mode=select).

The paper chose its beam size and length penalty on the development set, and evaluated the
average of its last checkpoints. `run_select` compares, on the validation split only (a choice
made on test would make the test score an optimistic one):
  - checkpoints: the latest, the averages of its last 2..K kept checkpoints (K: those of the
    latest max_checkpoints_to_keep that exist), and the average that training saved
    (--checkpoint=averaged; it takes the place of the on-the-fly average of the same steps);
  - decoding settings, for variants that translate: DECODINGS, scored by BLEU; other variants
    compare checkpoints on the validation loss.
Every point goes through inference.run_eval, which also writes its eval_validation_*.json. The
rows go to WORKDIR/select.json and a table to stdout; the best row to WORKDIR/selected.json, which
`resolve` makes the default checkpoint and decoding setting of the modes that load a model, below
what the command line sets.
"""

import copy
import json
import os
from typing import Iterable

import jax
from absl import logging
from etils import epath

from transformer import checkpoint, errors, inference, variants

SPLIT = 'validation'  # the only split select reads
# (beam_size, length_penalty) compared for translation: greedy (no length penalty), and beam 4 with
# the paper's alpha and with a stronger preference for longer outputs.
DECODINGS = ((1, None), (4, 0.6), (4, 1.0))
DECODING_FIELDS = ('beam_size', 'length_penalty')
ROWS = 'select.json'
SELECTED = 'selected.json'


def _candidates(config, workdir: str):
  """(--checkpoint value, restored) of each checkpoint to compare, restored one after another."""
  kept = checkpoint.committed_steps(workdir)[-config.max_checkpoints_to_keep:]
  if not kept:
    raise errors.MissingError(f'No checkpoint in {workdir}/{checkpoint.CHECKPOINTS} to select '
                              f'from: train first with --mode=train --workdir={workdir}')
  names = [','.join(map(str, kept[-k:])) for k in range(1, len(kept) + 1)]
  averaged = None
  if checkpoint.committed_steps(workdir, checkpoint.AVERAGED):
    averaged = inference.restore(config, workdir, 'averaged')
    same = ','.join(map(str, averaged[2]))
    names = [n for n in names if n != same]  # the same parameters: score them once
  for name in names:
    yield name, inference.restore(config, workdir, name)
  if averaged:
    yield 'averaged', averaged


def _with_decoding(config, beam_size: int | None, length_penalty: float | None):
  config = copy.deepcopy(config)
  if beam_size is not None:
    config.beam_size = beam_size
  if length_penalty is not None:
    config.length_penalty = length_penalty
  return config


def run_select(config, workdir: str) -> dict:
  """Evaluates every checkpoint and decoding setting on validation; writes select.json (every
  row) and selected.json (the best row), prints a table and returns the best row."""
  translates = variants.get(config.variant).translates
  metric = 'bleu' if translates else 'loss'
  decodings = DECODINGS if translates else ((None, None),)
  rows = []
  for name, restored in _candidates(config, workdir):
    ctx, params, _ = restored
    losses = inference.split_losses(ctx, params, SPLIT)  # once: decoding does not change them
    for beam_size, length_penalty in decodings:
      result = inference.run_eval(_with_decoding(config, beam_size, length_penalty), workdir,
                                  SPLIT, name, restored=restored, losses=losses)
      rows.append(dict(checkpoint=name, steps=result['averaged_steps'], beam_size=beam_size,
                       length_penalty=length_penalty, metric=metric, value=result[metric]))
  # The first of equal rows wins: the latest checkpoint, greedy, before costlier settings.
  best = (max if translates else min)(rows, key=lambda row: row['value'])
  print(_table(rows, best, metric, translates))
  if jax.process_index() == 0:
    folder = epath.Path(os.fspath(workdir))
    (folder / ROWS).write_text(json.dumps(dict(split=SPLIT, metric=metric, rows=rows), indent=2))
    newest = checkpoint.committed_steps(workdir)[-1]
    (folder / SELECTED).write_text(json.dumps(dict(best, split=SPLIT, newest_step=newest),
                                              indent=2))
    logging.info('Wrote %s and %s.', folder / ROWS, folder / SELECTED)
  return best


def _table(rows: list[dict], best: dict, metric: str, translates: bool) -> str:
  direction = 'higher' if translates else 'lower'
  lines = [f'{SPLIT} {metric} ({direction} is better):',
           f'{"checkpoint":<20} {"beam":>4} {"alpha":>5} {metric:>8}']
  for row in rows:
    beam = '-' if row['beam_size'] is None else row['beam_size']
    alpha = '-' if row['length_penalty'] is None else f'{row["length_penalty"]:g}'
    name = row['checkpoint']
    if name == 'averaged':
      name += f' ({",".join(map(str, row["steps"]))})'
    mark = '  <- selected' if row is best else ''
    lines.append(f'{name:<20} {beam:>4} {alpha:>5} {row["value"]:>8.3f}{mark}')
  return '\n'.join(lines)


def resolve(config, workdir: str, which: str | None, overridden: Iterable[str]):
  """(config, --checkpoint value) for a mode that loads a model. The command line wins (which:
  --checkpoint, None if not given; overridden: the config fields it sets), then what --mode=select
  recorded in WORKDIR/selected.json, then the config and the latest checkpoint. Logs each setting
  and where it came from."""
  path = epath.Path(os.fspath(workdir)) / SELECTED
  selected = json.loads(path.read_text()) if path.exists() else {}
  if which is not None:
    used = [f'checkpoint {which} (--checkpoint)']
  elif selected:
    which = selected['checkpoint']
    used = [f'checkpoint {which} ({path})']
  else:
    which = 'latest'
    used = ['checkpoint latest (the default)']
  config = copy.deepcopy(config)
  if variants.get(config.variant).translates:
    for field in DECODING_FIELDS:
      if field in overridden:
        source = f'--config.{field}'
      elif selected.get(field) is not None:
        config[field] = selected[field]
        source = str(path)
      else:
        source = 'the config'
      used.append(f'{field} {config[field]} ({source})')
  logging.info('Using %s.', ', '.join(used))
  newest = checkpoint.committed_steps(workdir)[-1:]
  if selected and newest and selected['newest_step'] != newest[0]:
    logging.warning('%s was chosen when the newest checkpoint was step %d; it is now step %d: '
                    'rerun --mode=select to compare the new checkpoints.', path,
                    selected['newest_step'], newest[0])
  return config, which
