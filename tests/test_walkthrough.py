"""docs/walkthrough.py runs end to end, and the committed docs/walkthrough.ipynb is its render.

The script trains for a few steps only (WALKTHROUGH_STEPS) into temporary folders; its own
assertions (hand-written attention and label smoothing against the library) fail it otherwise.
The notebook must hold the .py's cells unchanged and a rendered plot for every plotting cell:
re-render it after editing the .py (see the .py's header).
"""

import os
import subprocess
import sys

import jupytext
import nbformat

from tests import run_helpers

pytestmark = run_helpers.needs_corpus

SCRIPT = os.path.join(run_helpers.ROOT, 'docs', 'walkthrough.py')
NOTEBOOK = os.path.join(run_helpers.ROOT, 'docs', 'walkthrough.ipynb')
STEPS = 10  # enough to write a checkpoint and decode from it; quality is not checked
TIMEOUT_S = 300  # about 60 s on a 2-core CPU
RENDER = 're-render it as the header of docs/walkthrough.py says'


def test_walkthrough_runs_as_a_script(tmp_path):
  # Two CPU devices, as on a laptop (the suite's eight fake ones make every compilation and the
  # matmul-peak measurement of MFU several times dearer).
  xla_flags = os.environ['XLA_FLAGS'].replace('--xla_force_host_platform_device_count=8',
                                              '--xla_force_host_platform_device_count=2')
  env = dict(os.environ, XLA_FLAGS=xla_flags, MPLBACKEND='Agg', WALKTHROUGH_STEPS=str(STEPS),
             WALKTHROUGH_DATA_DIR=str(tmp_path / 'data'),
             WALKTHROUGH_WORKDIR=str(tmp_path / 'workdir'))
  result = subprocess.run([sys.executable, SCRIPT], cwd=run_helpers.ROOT, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
  assert result.returncode == 0, (f'docs/walkthrough.py exited {result.returncode}; stderr '
                                  f'ends:\n{result.stderr[-3000:]}')
  assert 'Hand-written attention equals MultiHeadAttention.' in result.stdout
  assert os.path.isdir(tmp_path / 'workdir' / 'checkpoints' / str(STEPS))


def _cells(notebook):
  return [(cell.cell_type, cell.source) for cell in notebook.cells]


def test_notebook_has_the_cells_of_the_script():
  script = jupytext.read(SCRIPT)
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  expected, committed = _cells(script), _cells(notebook)
  assert len(committed) == len(expected), (
      f'{len(committed)} cells in the notebook, {len(expected)} in the script; {RENDER}')
  for index, (want, have) in enumerate(zip(expected, committed)):
    assert have == want, f'cell {index} differs from docs/walkthrough.py; {RENDER}'


def test_notebook_shows_every_plot():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  plotting = [i for i, cell in enumerate(notebook.cells)
              if cell.cell_type == 'code' and 'plt.show()' in cell.source]
  assert len(plotting) >= 5  # masks, positional encoding, loss, two attention heatmaps
  images = {i: sum('image/png' in output.get('data', {}) for output in cell.outputs)
            for i, cell in enumerate(notebook.cells) if cell.cell_type == 'code'}
  assert sum(images.values()) >= len(plotting)
  missing = [i for i in plotting if not images[i]]
  assert not missing, f'plotting cells {missing} have no image output; {RENDER}'
