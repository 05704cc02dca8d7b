"""Operating the trainer: mistakes fail at once in one line, a workdir has one run at a time,
Ctrl-C saves, a resumed run keeps its config unless told, and a corrupted checkpoint is not used.

Most tests run `python -m launch.main` as a user would (original:tiny on a small real corpus).
"""

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils.epath import testing as epath_testing

from tests import run_helpers as rh
from transformer import (checkpoint, config_checks, data, distributed, errors, inference, optim,
                         train, visualize, workdir)

pytestmark = [
    rh.needs_corpus,
    # A failed restore leaves orbax's pending reads to complete after its event loop closed.
    pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning'),
]
NEVER = 100_000  # a period (steps) that a test run never reaches


def config_for(**extra):
  return rh.make_config(rh.prepared_data_dir(), **extra)


def run_main(workdir, *flags, env=None, **config) -> subprocess.CompletedProcess:
  return subprocess.run(rh.main_command(workdir, rh.prepared_data_dir(), *flags, **config),
                        cwd=rh.ROOT, capture_output=True, text=True,
                        timeout=rh.SUBPROCESS_TIMEOUT_S, env=dict(os.environ, **(env or {})))


def error_line(result: subprocess.CompletedProcess) -> str:
  """The one line a user error ends with: exit 1, 'Error: ...', no traceback anywhere."""
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('Error: '), result.stderr[-3000:]
  return last


def snapshot(folder) -> dict:
  """{relative path: file bytes, or None for a folder} of everything under folder."""
  out = {}
  for root, dirs, files in os.walk(folder):
    for name in dirs:
      out[os.path.relpath(os.path.join(root, name), folder)] = None
    for name in files:
      with open(os.path.join(root, name), 'rb') as f:
        out[os.path.relpath(os.path.join(root, name), folder)] = f.read()
  return out


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> str:
  """A workdir of 4 steps with checkpoints 2 and 4; tests work on copies of it."""
  path = str(tmp_path_factory.mktemp('trained') / 'run')
  train.train_and_evaluate(config_for(num_train_steps=4, checkpoint_every_steps=2), path)
  assert rh.committed_steps(path) == [2, 4]
  return path


@pytest.fixture
def resumable(trained, tmp_path) -> str:
  path = str(tmp_path / 'run')
  shutil.copytree(trained, path)
  return path


# --- 4. User errors: one line, early, nothing written ---------------------------------------------

@pytest.mark.parametrize('overrides, expected', [
    (dict(num_heads=3), 'config.d_model=32 is not divisible by config.num_heads=3'),
    (dict(grad_accum_steps=3), 'config.batch_size=8 is not divisible by config.grad_accum_steps=3'),
    (dict(variant='unilm_prefix', positional='learned', max_len=40),
     'Sequences of 49 (inputs), 49 (targets)'),  # max_source_len + max_target_len + 1
    (dict(variant='gpt_causal', positional='learned', block_size=65), 'Sequences of 65 (inputs)'),
    (dict(schedule='cosin'), "config.schedule='cosin' is not one of rsqrt, cosine, constant"),
    (dict(optimizer='sgd'), "config.optimizer='sgd' is not one of adamw, adafactor, lion"),
    (dict(on_nonfinite='ignore'), "config.on_nonfinite='ignore' is not one of stop, skip"),
    (dict(positional='rope'), "config.positional='rope' is not one of sinusoidal"),
    (dict(activation='gelu2'), "config.activation='gelu2' is not one of relu"),
    (dict(tokenizer='bpe'), "config.tokenizer='bpe' is not one of sentencepiece"),
    (dict(variant='gpt'), "config.variant='gpt' is not one of original"),
    (dict(norm='batchnorm'), "config.norm='batchnorm' is not one of layernorm, rmsnorm"),
    (dict(ffn='moe'), "config.ffn='moe' is not one of dense, gated"),
    (dict(num_heads=4, num_kv_heads=3), 'config.num_heads=4 is not divisible by '
                                        'config.num_kv_heads=3'),
    (dict(attention_kind='low_rank'), 'not variant=original, packing=False, '
                                      'positional=sinusoidal'),
    (dict(attention_kind='sparse'),
     "config.attention_kind='sparse' is not one of full, local, strided, low_rank, lsh"),
    (dict(attention_kind='strided', attention_window=0),
     'config.attention_window=0 must be at least 1 (attention_kind=strided)'),
    (dict(attention_kind='strided', attention_impl='cudnn'),
     'config.attention_kind=strided joins several key sets in one softmax of its own: '
     'attention_impl=cudnn cannot compute it'),
    (dict(attention_kind='lsh', lsh_buckets=3), 'config.lsh_buckets=3 must be even and at least 2'),
    (dict(attention_kind='lsh', lsh_rounds=0), 'config.lsh_rounds=0 must be at least 1'),
    (dict(attention_kind='lsh', positional='alibi'),
     'config.attention_kind=lsh reads its keys in hash-bucket order, for which no logit bias is '
     'computed: positional=alibi cannot be used with it'),
    (dict(attention_kind='lsh', qk_norm=True),
     'config.attention_kind=lsh has no keys of its own (each is its query, unit-normalised): '
     'set qk_norm=False'),
    (dict(attention_impl='flash'), "config.attention_impl='flash' is not one of xla, cudnn, auto"),
    (dict(remat='some'), "config.remat='some' is not one of none, full, dots, dots_no_batch"),
    (dict(scan_layers=True, share_layers=True), 'config.share_layers has one for all'),
    (dict(attention_impl='cudnn', attention_dropout_rate=0.1),
     'config.attention_impl=cudnn (jax.nn.dot_product_attention) applies no attention dropout'),
    (dict(subword_split_rate=1.0), 'config.subword_split_rate=1.0 must be 0 (off) or between'),
    (dict(subword_split_rate=0.1, spm_model_type='unigram'),
     'config.subword_split_rate=0.1 needs a BPE vocabulary (config.tokenizer=sentencepiece, '
     'config.spm_model_type=bpe), not tokenizer=sentencepiece, spm_model_type=unigram'),
    (dict(subword_split_rate=0.1, variant='gpt_causal'),
     'not the windows of block_size tokens that config.variant=gpt_causal reads'),
], ids=lambda x: ','.join(x) if isinstance(x, dict) else None)
def test_config_mistakes_are_named_without_devices(overrides, expected):
  with pytest.raises(errors.ConfigError, match=re.escape(expected)):
    config_checks.check(config_for(**overrides))


def test_mode_batch_and_field_checks():
  config = config_for(batch_size=12)
  with pytest.raises(errors.ConfigError, match='needs a variant that generates'):
    config_checks.check(config, 'generate')
  with pytest.raises(errors.ConfigError, match=r'config.batch_size=12 must be a multiple of 8: .* '
                                               r'over 8 data-parallel devices'):
    config_checks.check_mesh(config, 'train')
  config_checks.check_mesh(config, 'eval')  # eval batches only: 8 divides eval_batch_size
  config = config_for(decode_batch_size=12)
  with pytest.raises(errors.ConfigError, match=r'config.decode_batch_size=12 must be a multiple '
                                               r'of 8'):
    config_checks.check_mesh(config, 'translate')
  with pytest.raises(errors.ConfigError, match=r'config.decode_batch_size=0 must be positive'):
    config_checks.check(config_for(decode_batch_size=0))
  with pytest.raises(errors.ConfigError, match='learnin_rate is not a config field'):
    config_checks.check_fields(config, ['learning_rate', 'learnin_rate'], '--allow_config_change')


@pytest.mark.parametrize('flags, config, expected, alone', [
    ((), dict(batch_size=3), 'config.batch_size=3 must be a multiple of 8', True),
    (('--config.learnin_rate=5',), {},
     'Unknown config field \'learnin_rate\'. Did you mean "learning_rate"', True),
    (('--mode=translate',), {}, 'No checkpoint in {workdir}/checkpoints: train first', False),
    (('--mode=fill_mask', '--text=' + 'Ein Hund <mask>. ' * 20),
     dict(config_file='configs/bert_mlm.py:tiny'), 'tokens long; the model reads at most', False),
], ids=['batch_size', 'misspelled_field', 'translate_untrained', 'fill_mask_too_long'])
def test_user_errors_print_one_line_and_create_nothing(tmp_path, flags, config, expected, alone):
  workdir = tmp_path / 'run'
  result = run_main(workdir, *flags, **config)
  line = error_line(result)
  assert expected.format(workdir=workdir) in line
  if alone:  # found before anything else happened
    assert result.stderr.strip() == line
  assert not workdir.exists()


def test_traceback_on_request(tmp_path):
  result = run_main(tmp_path / 'run', env={'TRANSFORMER_TRACEBACK': '1'}, batch_size=3)
  assert result.returncode == 1 and 'Traceback' in result.stderr
  assert 'ConfigError: config.batch_size=3' in result.stderr


# --- 1. One run per workdir -----------------------------------------------------------------------

def test_a_second_run_is_refused_and_changes_nothing(resumable):
  # A leftover of an interrupted save: a run that started would remove it.
  os.mkdir(os.path.join(resumable, 'checkpoints', '6.orbax-checkpoint-tmp-1700000000'))
  with workdir.Lock(resumable):  # this test process is the run in progress
    before = snapshot(resumable)
    result = run_main(resumable, num_train_steps=6)
    assert snapshot(resumable) == before
  line = error_line(result)
  assert (f'{resumable} is in use by process {os.getpid()} on {socket.gethostname()}, started '
          in line)
  assert f'--force_unlock or delete {resumable}/run.lock' in line
  assert not os.path.exists(os.path.join(resumable, 'run.lock'))  # released


def test_lock_of_a_dead_process_is_taken_over_and_another_hosts_needs_force(tmp_path, caplog):
  path = tmp_path / 'run'
  gone = subprocess.Popen(['true'])
  gone.wait()
  lock = path / 'run.lock'
  path.mkdir()
  lock.write_text(json.dumps(dict(host=socket.gethostname(), pid=gone.pid)))
  with caplog.at_level(logging.WARNING), workdir.Lock(path):
    assert json.loads(lock.read_text())['pid'] == os.getpid()
  assert f'Taking over {lock} from process {gone.pid}' in caplog.text
  assert 'no longer running' in caplog.text
  assert not lock.exists()

  lock.write_text(json.dumps(dict(host='elsewhere', pid=1)))
  with pytest.raises(workdir.WorkdirLockedError, match='in use by process 1 on elsewhere'):
    with workdir.Lock(path):
      pass
  with caplog.at_level(logging.WARNING), workdir.Lock(path, force=True):
    pass
  assert 'on elsewhere (--force_unlock)' in caplog.text

  with pytest.raises(errors.ConfigError):  # a run that fails before writing leaves no workdir
    with workdir.Lock(tmp_path / 'new'):
      raise errors.ConfigError('bad value')
  assert not (tmp_path / 'new').exists()


# --- 3. Ctrl-C ------------------------------------------------------------------------------------

def test_ctrl_c_saves_exits_130_and_the_rerun_resumes(tmp_path, caplog):
  path = str(tmp_path / 'run')
  checkpoints = os.path.join(path, 'checkpoints')
  log = tmp_path / 'train.log'
  proc = rh.start(rh.main_command(path, rh.prepared_data_dir(), num_train_steps=NEVER,
                                  eval_every_steps=NEVER, checkpoint_every_steps=NEVER), log)
  rh.wait_for(rh.log_contains(log, f'step 2/{NEVER}'), [proc], 'step 2 in the log')
  with open(os.path.join(path, 'run.lock'), encoding='utf-8') as f:
    assert json.load(f)['pid'] == proc.pid  # the training run holds its workdir
  rh.send(proc, signal.SIGINT)
  assert rh.wait_all([proc]) == [130], rh.read(log)[-3000:]
  text = rh.read(log)
  saved = re.findall(rf'Interrupted \(SIGINT\): saving step (\d+) to {checkpoints}/(\d+) and '
                     'exiting; rerun to resume.', text)
  assert len(saved) == 1 and saved[0][0] == saved[0][1], text[-3000:]
  assert 'Traceback' not in text and 'RuntimeError' not in text
  stop = int(saved[0][0])
  assert rh.committed_steps(path) == [stop]
  assert sorted(os.listdir(path)) == ['checkpoints', 'config.json', 'metrics.jsonl', 'tensorboard']

  with caplog.at_level(logging.INFO):
    state, _ = train.train_and_evaluate(config_for(num_train_steps=stop + 2,
                                                   eval_every_steps=NEVER,
                                                   checkpoint_every_steps=NEVER), path)
  assert f'Resumed from {checkpoints} at step {stop}.' in caplog.text
  assert int(state.step) == stop + 2


def test_a_second_ctrl_c_stops_at_once():
  before = signal.getsignal(signal.SIGINT)
  with distributed.PreemptionNotice() as notice:
    signal.raise_signal(signal.SIGINT)
    assert notice.received == 'SIGINT' and notice.reached(1)
    with pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is before  # restored


def test_unfinished_saves_are_named_and_removed_by_training_only(tmp_path, caplog):
  unfinished = tmp_path / 'run' / 'checkpoints' / '7.orbax-checkpoint-tmp-1700000000'
  unfinished.mkdir(parents=True)
  with caplog.at_level(logging.WARNING):
    with checkpoint.Checkpointer(tmp_path / 'run', config_for(), 1, read_only=True):
      pass  # a reader (eval while training) leaves a save in progress alone
    assert unfinished.exists() and not caplog.text
    with checkpoint.Checkpointer(tmp_path / 'run', config_for(), 1):
      pass
  assert f'unfinished checkpoint folder(s) that an interrupted save left in {unfinished.parent}: ' \
         f'{unfinished.name}.' in caplog.text
  rh.wait_for(lambda: not unfinished.exists(), [], 'orbax removing the unfinished save')


# --- 2. Config drift on resume --------------------------------------------------------------------

def test_config_drift_is_refused_and_writes_nothing(resumable):
  before = snapshot(resumable)
  result = run_main(resumable, num_train_steps=6, learning_rate=5)
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-3000:]
  message = result.stderr[result.stderr.index('Error: '):]
  assert f'Error: {resumable}/config.json differs from this config' in message
  assert '  learning_rate: 1.0 -> 5.0\n' in message
  assert 'num_train_steps' not in message  # free to change
  assert '--allow_config_change=learning_rate' in message
  assert snapshot(resumable) == before


def test_allowed_config_change_is_recorded(resumable):
  config = config_for(num_train_steps=6, checkpoint_every_steps=2, learning_rate=5.0)
  state, _ = train.train_and_evaluate(config, resumable, allow_config_change=['learning_rate'])
  assert int(state.step) == 6
  with open(os.path.join(resumable, 'config_history.jsonl'), encoding='utf-8') as f:
    history = [json.loads(line) for line in f]
  assert len(history) == 1 and history[0]['step'] == 4
  assert history[0]['changes'] == {'learning_rate': {'old': 1.0, 'new': 5.0},
                                   'num_train_steps': {'old': 4, 'new': 6}}
  with open(os.path.join(resumable, 'metrics.jsonl'), encoding='utf-8') as f:
    marks = [r for r in map(json.loads, f) if 'config_change' in r]
  assert [(r['step'], r['config_change']['learning_rate']) for r in marks] == [(4, [1.0, 5.0])]
  with open(os.path.join(resumable, 'config.json'), encoding='utf-8') as f:
    assert json.load(f)['learning_rate'] == 5.0


def test_bookkeeping_fields_change_freely_but_not_the_length_of_a_cosine(tmp_path):
  (tmp_path / 'checkpoints' / '4').mkdir(parents=True)  # a checkpoint: the run resumes
  for schedule in ('rsqrt', 'cosine'):
    (tmp_path / 'config.json').write_text(json.dumps(config_for(schedule=schedule).to_dict()))
    changed = config_for(schedule=schedule, num_train_steps=99, eval_every_steps=7)
    if schedule == 'rsqrt':
      assert workdir.config_changes(tmp_path, changed) == {'num_train_steps': (40, 99),
                                                           'eval_every_steps': (1000, 7)}
    else:  # the cosine decays over num_train_steps: a new length changes every later rate
      with pytest.raises(workdir.ConfigDriftError, match=r'\n  num_train_steps: 40 -> 99\n'):
        workdir.config_changes(tmp_path, changed)


# --- 5. Checkpoint integrity ----------------------------------------------------------------------

def toggle_bit(path: str, offset: int):
  with open(path, 'r+b') as f:
    f.seek(offset)
    byte = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([byte ^ 0x10]))


def flip_silently(state_dir: str):
  """Flips one bit of a checkpoint's array data files where orbax still reads the state, only with
  other values: the corruption that only a checksum reveals. Tries a few places, for many bytes
  of the data files are never read (and a flip in a compressed header is caught anyway)."""
  abstract, _ = train.Experiment(config_for()).abstract_state()

  def read():
    with ocp.StandardCheckpointer() as reader:  # orbax alone: no checksum
      return rh.numpy_tree(reader.restore(state_dir, abstract))

  original = read()
  files = [os.path.join(root, name) for root, _, names in os.walk(state_dir)
           if os.path.basename(root) == 'd' for name in names]
  for path in sorted(files, key=os.path.getsize, reverse=True):
    for fraction in (0.1, 0.3, 0.5, 0.7, 0.9):
      offset = int(os.path.getsize(path) * fraction)
      toggle_bit(path, offset)
      try:
        if not all(jax.tree.leaves(jax.tree.map(np.array_equal, read(), original))):
          return
      except Exception:  # pylint: disable=broad-except  # unreadable: not silent
        pass
      toggle_bit(path, offset)
  pytest.fail(f'no bit of {state_dir} flips silently')


def test_flipped_bit_falls_back_to_the_previous_checkpoint(resumable, caplog):
  checkpoints = os.path.join(resumable, 'checkpoints')
  flip_silently(os.path.join(checkpoints, '4', 'state'))
  with caplog.at_level(logging.WARNING):
    state, _ = train.train_and_evaluate(config_for(num_train_steps=6), resumable)
  assert f'Checkpoint {checkpoints}/4 could not be restored' in caplog.text
  assert (f'Resumed from {checkpoints}/2 instead of the newer unreadable checkpoint(s) 4'
          in caplog.text)
  assert int(state.step) == 6


def rewrite_with_a_parameter_bit_flipped(state_dir: str):
  """Rewrites a checkpoint's state, valid to orbax, with one bit of one parameter flipped (the
  files compress the arrays, so a flipped byte on disk rarely lands in a parameter and decodes)."""
  abstract, _ = train.Experiment(config_for()).abstract_state()
  with ocp.StandardCheckpointer() as orbax_alone:
    state = jax.tree.map(np.array, rh.numpy_tree(orbax_alone.restore(state_dir, abstract)))
  state.params['encoder']['layer_0']['ffn']['wi']['kernel'].view(np.uint32).flat[5] ^= 1 << 4
  shutil.rmtree(state_dir)
  with ocp.StandardCheckpointer() as orbax_alone:
    orbax_alone.save(state_dir, state)


def test_flipped_parameter_bit_is_caught_when_using_the_model(resumable, caplog):
  checkpoints = os.path.join(resumable, 'checkpoints')
  rewrite_with_a_parameter_bit_flipped(os.path.join(checkpoints, '4', 'state'))
  with caplog.at_level(logging.WARNING):
    _, _, steps = inference.restore(config_for(), resumable, 'latest')
  assert steps == [2]
  assert (f'Using {checkpoints}/2 instead of the newer unreadable checkpoint(s) 4'
          in caplog.text)
  with pytest.raises(checkpoint.UnreadableCheckpointsError, match='checksum mismatch'):
    inference.restore(config_for(), resumable, '4')


def test_checksum_sees_every_bit_whatever_the_layout():
  x = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)
  tree = {'w': x, 'step': np.int32(3)}
  reference = checkpoint.state_checksum(tree)
  mesh = jax.make_mesh((8,), ('data',))
  sharded = jax.device_put(x, jax.NamedSharding(mesh, jax.P('data')))
  assert checkpoint.state_checksum({'w': sharded, 'step': np.int32(3)}) == reference
  bits = x.view(np.uint32)
  for index, bit in [((0, 0), 0), ((3, 4), 31), ((7, 5), 12)]:
    flipped = bits.copy()
    flipped[index] ^= np.uint32(1 << bit)
    changed = checkpoint.state_checksum({'w': flipped.view(np.float32), 'step': np.int32(3)})
    assert changed['w'] != reference['w'] and changed['step'] == reference['step']


# --- 7. Using a model: its parameters alone -------------------------------------------------------

def test_using_a_model_reads_its_parameters_alone(trained, tmp_path, monkeypatch):
  """eval/translate/generate/fill_mask restore no optimizer state and build no optimizer or
  training data: orbax is asked for the parameters only (a partial restore)."""
  config = config_for()
  saved = rh.restore_state(trained, config, 4)
  requested = []
  partial_restore = ocp.args.PyTreeRestore

  def recording_partial_restore(item, **kwargs):
    requested.append(sorted(item))
    return partial_restore(item=item, **kwargs)

  def never(*args, **kwargs):
    raise AssertionError('using a model built an optimizer, a full restore or training data')

  monkeypatch.setattr(ocp.args, 'PyTreeRestore', recording_partial_restore)
  for module, name in ((optim, 'make_optimizer'), (ocp.args, 'StandardRestore'),
                       (data, 'make_train_iterator'), (data, 'make_eval_batches')):
    monkeypatch.setattr(module, name, never)
  ctx, params, steps = inference.restore(config, trained, 'latest')
  assert steps == [4] and requested == [['params']] and not hasattr(ctx, 'optimizer')
  rh.assert_trees_equal(rh.numpy_tree(params), rh.numpy_tree(saved.params))
  source = tmp_path / 'source.de'
  source.write_text('Ein Hund läuft.\n', encoding='utf-8')
  inference.run_translate(config, trained, str(source), str(tmp_path / 'out.en'))
  assert len((tmp_path / 'out.en').read_text(encoding='utf-8').splitlines()) == 1


# --- 8. A gs:// workdir ---------------------------------------------------------------------------

def test_workdir_files_of_a_gs_workdir_go_through_epath(tmp_path, monkeypatch):
  """The lock, config.json, its history and appends on a gs:// workdir, with etils' mock backend
  standing in for the object store (gs://bucket/... -> tmp_path/store/bucket/...). A file opened
  without epath would land in ./gs:/ instead."""
  store, cwd = tmp_path / 'store', tmp_path / 'cwd'
  cwd.mkdir()
  monkeypatch.chdir(cwd)

  def in_store(original, path, *args, **kwargs):
    return original(os.fspath(path).replace('gs://', f'{store}/'), *args, **kwargs)

  calls = ('exists', 'isdir', 'listdir', 'makedirs', 'mkdir', 'open', 'remove', 'rmtree', 'stat')
  run, local = 'gs://bucket/run', store / 'bucket' / 'run'
  recorded = []
  metrics = type('Writer', (), {'write': lambda self, step, m: recorded.append((step, m))})()
  with epath_testing.mock_epath(**{name: in_store for name in calls}):
    with workdir.Lock(run):
      assert json.loads((local / 'run.lock').read_text())['pid'] == os.getpid()
      with pytest.raises(workdir.WorkdirLockedError, match=f'{run} is in use by process'):
        with workdir.Lock(run):
          pass
      workdir.record_config(run, config_for(), {}, 0, metrics)
      (local / 'checkpoints' / '4').mkdir(parents=True)  # the next run resumes
      with pytest.raises(workdir.ConfigDriftError, match='learning_rate: 1.0 -> 5.0'):
        workdir.config_changes(run, config_for(learning_rate=5.0))
      for rate in (5.0, 7.0):  # two resumed runs, each changing the rate
        changed = config_for(learning_rate=rate)
        changes = workdir.config_changes(run, changed, ['learning_rate'])
        workdir.record_config(run, changed, changes, 4, metrics)
  assert not (local / 'run.lock').exists()
  assert json.loads((local / 'config.json').read_text())['learning_rate'] == 7.0
  history = [json.loads(line) for line in (local / 'config_history.jsonl').read_text().splitlines()]
  assert [h['changes'] for h in history] == [{'learning_rate': {'old': 1.0, 'new': 5.0}},
                                             {'learning_rate': {'old': 5.0, 'new': 7.0}}]
  assert recorded == [(4, {'config_change': {'learning_rate': [1.0, 5.0]}}),
                      (4, {'config_change': {'learning_rate': [5.0, 7.0]}})]
  assert os.listdir(cwd) == []  # nothing written around epath
  with epath_testing.mock_epath(**{name: in_store for name in calls}):
    paths = visualize.write_teaching_plots(f'{run}/plots', schedule=lambda step: 1.0, num_steps=4)
  assert paths and all(p.startswith(f'{run}/plots/') for p in paths)
  assert sorted(os.listdir(local / 'plots')) == sorted(os.path.basename(p) for p in paths)
  assert os.listdir(cwd) == []


def test_compiled_programs_are_kept_in_the_flags_folder_unless_the_environment_names_one(
    tmp_path):
  from_environment = jax.config.jax_compilation_cache_dir  # conftest's JAX_COMPILATION_CACHE_DIR
  assert from_environment
  try:
    distributed.keep_compiled_programs(str(tmp_path / 'flag'))
    assert jax.config.jax_compilation_cache_dir == from_environment
    jax.config.update('jax_compilation_cache_dir', None)  # as without the environment variable
    distributed.keep_compiled_programs('~/cache_from_the_flag')
    assert jax.config.jax_compilation_cache_dir == os.path.expanduser('~/cache_from_the_flag')
    jax.config.update('jax_compilation_cache_dir', None)
    distributed.keep_compiled_programs('')  # off
    assert jax.config.jax_compilation_cache_dir is None
  finally:
    jax.config.update('jax_compilation_cache_dir', from_environment)
