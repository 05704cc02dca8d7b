"""What a training run keeps in its workdir besides checkpoints: a lock, its config and the history
of that config.

- WORKDIR/run.lock: who trains in this workdir (host, pid, start time, command). Two runs on one
  workdir would overwrite each other's checkpoints and interleave their metrics, so a second run
  is refused, changing nothing. The lock is removed when its run ends, however it ends; one left
  by a run that was killed (kill -9, a crash) is taken over when its process is gone from this
  host. A lock from another host cannot be checked: --force_unlock takes it over.
- WORKDIR/config.json: the config of the latest run. A resumed run (the workdir holds a
  checkpoint) must have the same config, field for field, except FREE_FIELDS and the fields the
  user allows (--allow_config_change): a change otherwise slips in silently, e.g. a learning rate
  typed for another run.
- WORKDIR/config_history.jsonl: one JSON line per resumed run that changed the config: the step
  from which the change applies, the time and each field's old and new value. metrics.jsonl gets
  a record at that step too, so that curves can be read against it.

Every path goes through etils.epath, as orbax's do, so a gs:// workdir works too (its lock is not
exclusive: see _create_exclusively). Only process 0 writes; every process learns the lock's
outcome.
"""

import datetime
import json
import os
import socket
import sys

import jax
from absl import logging
from etils import epath

from transformer import checkpoint, distributed, errors, writer as writer_lib

LOCK = 'run.lock'
CONFIG = 'config.json'
HISTORY = 'config_history.jsonl'

# Fields that change how a run is observed, stored or where it reads its data, never what it
# computes: a resumed run may change them without --allow_config_change (they are still recorded).
FREE_FIELDS = (
    'num_train_steps',  # extends or shortens a run (not under the cosine schedule: see below)
    'log_every_steps', 'eval_every_steps', 'checkpoint_every_steps', 'max_checkpoints_to_keep',
    'average_last_checkpoints',  # what is saved after the last step, beside the checkpoints
    'data_dir', 'raw_data_dir',  # where the same data is found
    'worker_count',  # grain workers read the same batches in the same order
    'peak_flops',  # only the MFU figure
    'keep_host_memory',  # only how malloc reuses memory
)


class WorkdirLockedError(errors.UserError):
  pass


class ConfigDriftError(errors.ConfigError):
  pass


def _path(workdir) -> epath.Path:
  return epath.Path(os.fspath(workdir))


# --- The lock ------------------------------------------------------------------------------------

def _running_here(holder: dict) -> bool:
  """Whether the holder may still run: true unless it is a process of this host that is gone."""
  if holder.get('host') != socket.gethostname():
    return True
  try:
    os.kill(int(holder['pid']), 0)  # signal 0 only asks whether the process exists
  except ProcessLookupError:
    return False
  except (KeyError, ValueError, PermissionError):  # no pid to check, or another user's process
    pass
  return True


def _create_exclusively(path: epath.Path, text: str) -> bool:
  """Writes a new file; False if it exists. On a local disk with O_EXCL, so that of two runs
  starting together one wins; an object store (gs://) has no such create: there two runs started
  within the same moment could both pass."""
  if writer_lib.is_remote(path):
    if path.exists():
      return False
    path.write_text(text)
    return True
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, 'w', encoding='utf-8') as f:
    f.write(text)
  return True


def _read_holder(path: epath.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):  # gone meanwhile, or still being written
    return {}


class Lock:
  """Held by process 0 while a run trains in `workdir`; a context manager.

  Entering raises WorkdirLockedError (on every process) if another run holds the workdir, having
  changed nothing. force: take the lock over whoever holds it (--force_unlock).
  """

  def __init__(self, workdir, force: bool = False):
    self.workdir = _path(workdir)
    self.path = self.workdir / LOCK
    self.force = force
    self._held = self._made_workdir = False

  def __enter__(self):
    error = self._acquire() if jax.process_index() == 0 else None
    if not distributed.all_processes(error is None):
      raise WorkdirLockedError(error or f'Process 0 could not lock {self.workdir}.')
    return self

  def __exit__(self, *exc_info):
    if not self._held:
      return
    self.path.unlink(missing_ok=True)
    if self._made_workdir and not any(self.workdir.iterdir()):
      self.workdir.rmdir()  # a run that stopped before writing anything leaves nothing behind
    self._held = False

  def _acquire(self) -> str | None:
    """None once this process holds the lock, else the message that names the holder."""
    self._made_workdir = not self.workdir.exists()
    self.workdir.mkdir(parents=True, exist_ok=True)
    me = dict(host=socket.gethostname(), pid=os.getpid(),
              started=datetime.datetime.now().isoformat(timespec='seconds'),
              command=' '.join(sys.argv))
    for _ in range(2):  # a second try after taking over a stale lock
      if _create_exclusively(self.path, json.dumps(me, indent=2) + '\n'):
        self._held = True
        return None
      holder = _read_holder(self.path)
      if not self.force and _running_here(holder):
        return _locked_message(self.path, holder)
      logging.warning('Taking over %s from process %s on %s (%s).', self.path, holder.get('pid'),
                      holder.get('host'), '--force_unlock' if self.force else 'no longer running')
      self.path.unlink(missing_ok=True)
    return _locked_message(self.path, _read_holder(self.path))


def _locked_message(path: epath.Path, holder: dict) -> str:
  who = (f'process {holder.get("pid")} on {holder.get("host")}, started {holder.get("started")}'
         if holder else 'a run whose lock file is unreadable')
  return (f'{path.parent} is in use by {who} (its command is in {path}). Wait for that run or '
          f'stop it; if it is gone, rerun with --force_unlock or delete {path}.')


# --- The config and its history ------------------------------------------------------------------

def _free_fields(config) -> set[str]:
  free = set(FREE_FIELDS)
  if config.schedule == 'cosine':
    free.discard('num_train_steps')  # the cosine schedule decays over num_train_steps
  return free


def config_changes(workdir, config, allowed=()) -> dict[str, tuple]:
  """{field: (saved, new)} where config differs from the workdir's config.json, if the run
  resumes (the workdir holds a checkpoint); {} for a new run.

  Raises ConfigDriftError, writing nothing, if a field outside FREE_FIELDS and `allowed` changed.
  Shape fields are left to checkpoint.Checkpointer, which refuses them whatever is allowed.
  """
  path = _path(workdir) / CONFIG
  if not checkpoint.committed_steps(workdir) or not path.exists():
    return {}
  saved = json.loads(path.read_text())
  new = json.loads(json.dumps(config.to_dict()))  # as config.json holds it (tuples are lists)
  # A field missing from config.json is newer than the run: it had no value to compare with.
  changes = {f: (saved[f], v) for f, v in new.items()
             if f in saved and saved[f] != v and f not in checkpoint.SHAPE_FIELDS}
  refused = {f: c for f, c in changes.items() if f not in _free_fields(config) | set(allowed)}
  if refused:
    raise ConfigDriftError(
        f'{path} differs from this config, and resuming would apply the change silently:\n'
        f'{_table(refused)}\nRerun with --allow_config_change={",".join(refused)} to apply it '
        f'(recorded in {HISTORY}), or with the saved values, or in another --workdir.')
  return changes


def _table(changes: dict[str, tuple]) -> str:
  return '\n'.join(f'  {f}: {old!r} -> {new!r}' for f, (old, new) in changes.items())


def record_config(workdir, config, changes: dict[str, tuple], step: int, writer):
  """Writes config.json and, if the resumed run changed it, a line of config_history.jsonl and a
  metrics.jsonl record at `step`, the first step trained with the change (process 0 only)."""
  if jax.process_index() != 0:
    return
  workdir = _path(workdir)
  (workdir / CONFIG).write_text(json.dumps(config.to_dict(), indent=2))
  if not changes:
    return
  logging.warning('Config changed from step %d on (see %s):\n%s', step, HISTORY,
                  _table(changes))
  record = dict(step=step, time=datetime.datetime.now().isoformat(timespec='seconds'),
                changes={f: dict(old=old, new=new) for f, (old, new) in changes.items()})
  writer_lib.append_line(workdir / HISTORY, json.dumps(record))
  writer.write(step, {'config_change': {f: [old, new] for f, (old, new) in changes.items()}})
