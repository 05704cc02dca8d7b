"""Run logs: WORKDIR/metrics.jsonl, TensorBoard event files (tensorboardX, no TensorFlow), console.

Only process 0 writes; other processes get a writer that does nothing.
"""

import json
import logging as logging_std
import os
import time

import jax
from absl import logging
from tensorboardX import SummaryWriter


class MetricWriter:
  """One JSON object per logging or evaluation step, mirrored to TensorBoard scalars."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    record = {'step': int(step), 'time': round(time.time(), 3), **metrics}
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for name, value in metrics.items():
      if isinstance(value, (int, float)):
        self._tb.add_scalar(name, value, step)
    self._tb.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
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
