"""Run logs: WORKDIR/metrics.jsonl, TensorBoard event files (tensorboardX, no TensorFlow), console.

Only process 0 writes; other processes get a writer that does nothing. Files go through
etils.epath (and tensorboardX's own gs:// support), so a gs:// workdir works like a local one.
"""

import json
import logging as logging_std
import os
import sys
import time

import jax
from absl import logging
from etils import epath


def _import_summary_writer():
  """tensorboardX's SummaryWriter, imported without torch.

  tensorboardX imports torch whenever it is installed (about 2 s at every start) only to accept
  torch tensors, which this project never logs; torch may be installed for the interop tests.
  """
  if 'torch' in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    return SummaryWriter
  sys.modules['torch'] = None  # An ImportError for `import torch` during this import only.
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    del sys.modules['torch']
  return SummaryWriter


SummaryWriter = _import_summary_writer()


def is_remote(path) -> bool:
  """Whether path is a URL (gs://, s3://): an object store, which cannot append or create
  exclusively."""
  return '://' in os.fspath(path)


def append_line(path: epath.Path, line: str):
  """Appends a line to a text file; on an object store the file is read and written again (fine
  for the small files of a run: metrics, config history)."""
  if is_remote(path):
    path.write_text((path.read_text() if path.exists() else '') + line + '\n')
    return
  with path.open('a') as f:
    f.write(line + '\n')


class MetricWriter:
  """One JSON object per logging or evaluation step, mirrored to TensorBoard scalars."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      workdir = epath.Path(os.fspath(workdir))
      workdir.mkdir(parents=True, exist_ok=True)
      self._jsonl = workdir / 'metrics.jsonl'
      self._tb = SummaryWriter(os.fspath(workdir / 'tensorboard'))

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    record = {'step': int(step), 'time': round(time.time(), 3), **metrics}
    append_line(self._jsonl, json.dumps(record))
    for name, value in metrics.items():
      if isinstance(value, (int, float)):
        self._tb.add_scalar(name, value, step)
    self._tb.flush()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()

  def close(self):
    if self.enabled:
      self._tb.close()


def progress_line(step: int, total: int, metrics: dict) -> str:
  line = (f'step {step}/{total}  loss {metrics["train_loss"]:.4f}  '
          f'ppl {metrics["train_ppl"]:.2f}  lr {metrics["learning_rate"]:.2e}')
  if 'step_ms' in metrics:
    eta = max(total - step, 0) * metrics['step_ms'] / 1000
    line += (f'  {metrics["tokens_per_s"]:,.0f} tok/s  {metrics["step_ms"]:.0f} ms/step  '
             f'ETA {int(eta // 60)}m{int(eta % 60):02d}s')
  return line


def log_progress(step: int, total: int, metrics: dict):
  if jax.process_index() == 0:
    logging.info(progress_line(step, total, metrics))


def quiet_library_logs():
  """Keeps INFO lines of third-party libraries (orbax, tfds, jax) out of the console."""
  class _OwnInfoOnly(logging_std.Filter):
    def filter(self, record):
      return record.levelno >= logging_std.WARNING or 'site-packages' not in record.pathname
  logging.get_absl_handler().addFilter(_OwnInfoOnly())
