"""Test setup: 8 fake CPU devices and strict rank promotion, before JAX is imported anywhere.

Tests compile many tiny programs and run each briefly, so XLA's slower optimisation passes are
turned off: compilation time dominates the suite on a 2-core machine.

Under CI (the environment variable CI set, as CI services do) a skipped test fails: a CI run can
never pass with tests left unrun, e.g. for want of the shared corpora in ../shared/data.
"""

import os
import tempfile

import pytest

_FLAGS = ('--xla_force_host_platform_device_count=8', '--xla_backend_optimization_level=0',
          '--xla_llvm_disable_expensive_passes=true')
_existing = os.environ.get('XLA_FLAGS', '')
os.environ['XLA_FLAGS'] = ' '.join(
    [_existing] + [f for f in _FLAGS if f.split('=')[0] not in _existing]).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Runs in one session compile the same programs again: a persistent cache makes that a lookup.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='jax_cache_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import jax  # noqa: E402

jax.config.update('jax_numpy_rank_promotion', 'raise')

SKIPS_FAIL = os.environ.get('CI', '').lower() not in ('', '0', 'false')


def _fail_skip(report):
  """Turns a skip report into a failure that gives the skip's reason."""
  if SKIPS_FAIL and report.skipped and not hasattr(report, 'wasxfail'):
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    report.outcome = 'failed'
    report.longrepr = (f'Skipped, which fails under CI={os.environ["CI"]}: '
                       f'{reason.removeprefix("Skipped: ")}')
  return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
  return _fail_skip((yield))


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector):  # a whole module skipped (pytest.importorskip, ...)
  return _fail_skip((yield))
