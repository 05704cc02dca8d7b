"""Helpers for tests that run the training loop in subprocesses (multi-process, fault tolerance).

Runs use original:tiny on a small real parallel corpus (multi30k val as train, test_2016 as
validation), prepared once per session so concurrent processes never prepare it together.
Subprocesses inherit the test environment (fast XLA flags, shared compilation cache).
"""

import atexit
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import grain
import jax
import numpy as np
import pytest

from configs import common, original
from transformer import checkpoint, data, train

RAW = common.SHARED_DATA
ROOT = common.REPO_ROOT
HAVE_CORPUS = os.path.isdir(os.path.join(RAW, 'multi30k'))
SUBPROCESS_TIMEOUT_S = 300


def needs_corpora(*names: str):
  """Skips unless RAW holds these corpora, naming each one missing (under CI a skip fails: see
  conftest.py)."""
  missing = [path for path in (os.path.join(RAW, name) for name in names)
             if not os.path.isdir(path)]
  return pytest.mark.skipif(bool(missing), reason=f'shared corpus missing: {", ".join(missing)}')


needs_corpus = needs_corpora('multi30k')


def overrides(data_dir: str, **extra) -> dict:
  files = {split: ':'.join(os.path.join(RAW, 'multi30k', f'{stem}.{lang}') for lang in ('de', 'en'))
           for split, stem in (('train', 'val'), ('eval', 'test_2016_flickr'))}
  return dict(dict(dataset='text', text_train_files=files['train'], text_eval_files=files['eval'],
                   data_dir=data_dir, bleu_max_sentences=0, log_every_steps=1,
                   eval_every_steps=1000, checkpoint_every_steps=1000, max_eval_batches=1,
                   batch_size=8, eval_batch_size=8, peak_flops=1e11,
                   num_cpu_devices=-1),  # the devices XLA_FLAGS gives, in and out of process
              **extra)


def make_config(data_dir: str, **extra):
  config = original.get_config('tiny')
  config.update(overrides(data_dir, **extra))
  return config


def main_command(workdir, data_dir: str, *flags: str, config_file='configs/original.py:tiny',
                 **extra) -> list[str]:
  """`python -m launch.main` with the same config as make_config(data_dir, **extra) (for
  original:tiny), then `flags`."""
  return [sys.executable, '-m', 'launch.main', *config_flags(data_dir, config_file, **extra),
          f'--workdir={workdir}', *flags]


def prepare_data_command(data_dir: str, config_file='configs/original.py:tiny',
                         **extra) -> list[str]:
  """`python -m launch.prepare_data` for the config of main_command(..., **extra)."""
  return [sys.executable, '-m', 'launch.prepare_data', *config_flags(data_dir, config_file, **extra)]


def config_flags(data_dir: str, config_file: str, **extra) -> list[str]:
  return [f'--config={config_file}',
          *(f'--config.{k}={v}' for k, v in overrides(data_dir, **extra).items())]


@functools.lru_cache(maxsize=None)
def prepared_data_dir() -> str:
  """A data dir holding the prepared corpus and tokenizer (once per test session)."""
  data_dir = tempfile.mkdtemp(prefix='runs_data_')
  atexit.register(shutil.rmtree, data_dir, ignore_errors=True)
  data.get_tokenizer(make_config(data_dir))
  return data_dir


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start(command: list[str], log_path, env: dict | None = None) -> subprocess.Popen:
  """Starts `command` in the repository root, stdout+stderr to log_path."""
  log = open(log_path, 'w', encoding='utf-8')  # pylint: disable=consider-using-with
  proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                          env=dict(os.environ, **(env or {})))
  log.close()
  return proc


def wait_all(procs: list[subprocess.Popen], timeout: float = SUBPROCESS_TIMEOUT_S) -> list[int]:
  """Return codes of procs; kills all of them if any is still running after `timeout`."""
  deadline = time.monotonic() + timeout
  try:
    return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
  finally:
    kill_all(procs)


def kill_all(procs: list[subprocess.Popen]):
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


def wait_for(predicate, procs: list[subprocess.Popen], what: str,
             timeout: float = SUBPROCESS_TIMEOUT_S, interval: float = 0.01):
  """Polls predicate() until true; fails (killing procs) on timeout or if a process exits."""
  deadline = time.monotonic() + timeout
  while not predicate():
    if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
      kill_all(procs)
      raise AssertionError(f'gave up waiting for {what} '
                           f'(return codes {[p.poll() for p in procs]})')
    time.sleep(interval)


def read(path) -> str:
  with open(path, encoding='utf-8', errors='replace') as f:
    return f.read()


def log_contains(path, text: str):
  return lambda: os.path.exists(path) and text in read(path)


def send(proc: subprocess.Popen, sig=signal.SIGTERM):
  os.kill(proc.pid, sig)


def committed_steps(workdir) -> list[int]:
  folder = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def restore_state(workdir, config, step: int):
  """The train state of checkpoint `step` of workdir, in config's 8-device layout."""
  exp = train.Experiment(config)
  abstract, _ = exp.abstract_state()
  ckpt = checkpoint.Checkpointer(workdir, config, exp.tokenizer.vocab_size)
  try:
    state, _ = ckpt.restore(abstract, step=step)
  finally:
    ckpt.close()
  return state


def numpy_tree(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_trees_equal(a, b, **tolerance):
  """Exactly equal, or allclose with the given tolerance."""
  check = (lambda x, y: np.testing.assert_allclose(x, y, **tolerance)) if tolerance else \
      np.testing.assert_array_equal
  jax.tree.map(check, numpy_tree(a), numpy_tree(b))


class ConcatenatedShards(grain.DatasetIterator):
  """The batches of several processes' train iterators, concatenated row-wise.

  One process reading this sees exactly the global batches that `process_count` processes
  each reading their own shard put together: a single-process reference for multi-process runs.
  """

  def __init__(self, shards):
    super().__init__(list(shards))
    self.shards = list(shards)

  def __next__(self):
    batches = [next(s) for s in self.shards]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self):
    return {'shards': [s.get_state() for s in self.shards]}

  def set_state(self, state):
    for s, sub in zip(self.shards, state['shards']):
      s.set_state(sub)


def emulate_processes(monkeypatch, process_count: int):
  """Makes train_and_evaluate (one process) read what `process_count` processes would read."""
  make = data.make_train_iterator

  def concatenated(config, tokenizer, **unused):
    del unused
    return ConcatenatedShards([make(config, tokenizer, process_index=p,
                                    process_count=process_count) for p in range(process_count)])

  monkeypatch.setattr(data, 'make_train_iterator', concatenated)
