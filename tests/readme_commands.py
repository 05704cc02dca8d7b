"""Runs the README's commands as written, shrunk to tiny configs, in a temporary folder.

  python -m tests.readme_commands            # run them all, in README order
  python -m tests.readme_commands --list     # print what would run and what is left out, and why

Each command keeps its module, mode and flags; what changes is its size (`:small`, `:medium`,
`:base`, `:big` become `:tiny`), step counts (at most 10 steps), and where it writes (workdirs,
exports and the prepared data go under one temporary folder). Commands run in README order, so a
mode that reads a workdir finds the one trained above it. The set-up, the test command and the
cluster submissions are left out: CI runs the first two, and the cluster scripts' command lines
are checked by tests/test_launch_scripts.py.
"""

import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, 'README.md')
# Commands left out, by the program they start, with the reason.
LEFT_OUT = {
    'python3 -m venv': 'the set-up: CI runs it',
    '.venv/bin/pip': 'the set-up: CI runs it',
    'pytest': 'the test command: CI runs it',
    'sbatch': 'a SLURM submission: tests/test_launch_scripts.py checks its command lines',
}
_SIZES = re.compile(r'(configs/\w+\.py):(small|medium|base|big)\b')
_STEPS = re.compile(r'(num_train_steps=)(\d+)')
_OUTPUT_FLAGS = ('--workdir=', '--to_hf=', '--out=', '--output=')
BENCHMARK_STEPS = ('--steps=2', '--warmup_steps=1')


def readme_commands(path: str = README) -> list[str]:
  """The shell commands of the README's ```bash blocks: continuations joined, comments dropped."""
  with open(path, encoding='utf-8') as f:
    blocks = re.findall(r'```bash\n(.*?)```', f.read(), flags=re.S)
  commands = []
  for block in blocks:
    for line in block.replace('\\\n', ' ').splitlines():
      words = shlex.split(line, comments=True)
      if words:  # shell operators stay unquoted
        commands.append(' '.join(w if w in ('&&', '|') else shlex.quote(w) for w in words))
  return commands


def left_out_reason(command: str) -> str | None:
  """Why a command is not run here (None: it is run). `a && b` counts by its last part."""
  last = command.split(' && ')[-1]
  for program, reason in LEFT_OUT.items():
    if program in last.split()[0] or (program == 'pytest' and '-m pytest' in last):
      return reason
  return None


def tiny(command: str, tmp: str) -> str:
  """The command at tiny size, writing under tmp, run by this Python interpreter."""
  command = command.split(' && ')[-1]
  command = re.sub(r'(^|\| )(\.venv/bin/)?python3? -m ', rf'\1{shlex.quote(sys.executable)} -m ',
                   command)
  command = _SIZES.sub(r'\1:tiny', command)
  command = _STEPS.sub(lambda m: m.group(1) + str(min(int(m.group(2)), 10)), command)
  for flag in _OUTPUT_FLAGS:
    command = command.replace(flag, f'{flag}{tmp}/')
  if 'launch.sweep' in command:
    command += f' --set=data_dir={tmp}/data'
  elif '--config=' in command:
    command += f' --config.data_dir={tmp}/data'
  if re.search(r'launch\.benchmark(_length)?\b', command):
    command += ' ' + ' '.join(BENCHMARK_STEPS)
  return command


def main(argv: list[str]) -> int:
  commands = readme_commands()
  with tempfile.TemporaryDirectory(prefix='readme_') as tmp:
    failures = 0
    for command in commands:
      reason = left_out_reason(command)
      if reason:
        print(f'left out ({reason}): {command}', flush=True)
        continue
      run = tiny(command, tmp)
      if '--list' in argv:
        print(f'would run: {run}')
        continue
      start = time.time()
      proc = subprocess.run(run, shell=True, cwd=REPO, capture_output=True, text=True,
                            env=dict(os.environ, DRY_RUN='1'))
      status = 'ok' if proc.returncode == 0 else f'FAILED (exit {proc.returncode})'
      print(f'{status} in {time.time() - start:.0f} s: {command}', flush=True)
      if proc.returncode:
        failures += 1
        print(f'  ran: {run}\n' + (proc.stdout + proc.stderr)[-3000:], flush=True)
  print(f'{len(commands)} commands, {failures} failed.')
  return 1 if failures else 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
