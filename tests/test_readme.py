"""The README's commands: the two on its first screen are what CI runs, and every other one is run.

`python -m tests.readme_commands` runs them at tiny size (`.ci/run` does, after the tests); these
checks make sure that no command escapes it and that the documents tell no story of their making.
"""

import glob
import os
import re

from tests import readme_commands

REPO = readme_commands.REPO
FIRST_SCREEN_LINES = 30


def _read(path):
  with open(os.path.join(REPO, path), encoding='utf-8') as f:
    return f.read()


def test_first_screen_shows_setup_and_test_commands_that_ci_runs():
  first_screen = '\n'.join(_read('README.md').splitlines()[:FIRST_SCREEN_LINES])
  commands = readme_commands.readme_commands()
  setup, tests = commands[0], commands[1]
  assert setup in first_screen.replace('\\\n', ' ') and tests in first_screen
  ci = _read('.ci/run')
  assert tests in ci.splitlines(), 'CI must run the README\'s test command as written'
  install = setup.split(' && ')[:2]  # CI adds only -q (quiet) to the README's install
  assert ' && '.join(install).replace('pip install', 'pip install -q') in ci


def test_every_command_is_run_or_left_out_for_a_stated_reason(tmp_path):
  commands = readme_commands.readme_commands()
  run = [c for c in commands if not readme_commands.left_out_reason(c)]
  assert len(run) >= 10, run  # train, the five modes, sweep, benchmark, convert, cluster scripts
  for command in run:
    shrunk = readme_commands.tiny(command, str(tmp_path))
    module = re.search(r'-m (launch\.\w+)', shrunk)
    script = re.search(r'(launch/\w+\.sh)', shrunk)
    assert module or script, f'neither a launch module nor a launch script: {command}'
    path = module.group(1).replace('.', '/') + '.py' if module else script.group(1)
    assert os.path.exists(os.path.join(REPO, path)), f'{path} (from: {command})'
    assert not re.search(r'\.py:(small|medium|base|big)\b', shrunk), shrunk
    writes_in_repo = re.search(r'--\w+=(runs|exported|data)/', shrunk)
    assert not writes_in_repo, f'{writes_in_repo.group()} would write into the checkout: {shrunk}'


def test_documents_tell_no_story_of_their_making():
  story = re.compile(r'machine [AB]\b|issue \d|\bsession\b|\bwe (built|wrote|tried)\b|'
                     r'calibration run|lettered', re.I)
  for path in ['README.md'] + sorted(glob.glob(os.path.join(REPO, 'docs', '*.md'))):
    for number, line in enumerate(_read(path).splitlines(), 1):
      assert not story.search(line), f'{path}:{number}: {line}'
