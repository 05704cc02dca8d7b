"""Test setup: 8 fake CPU devices and strict rank promotion, before JAX is imported anywhere.

Tests compile many tiny programs and run each briefly, so XLA's slower optimisation passes are
turned off: compilation time dominates the suite on a 2-core machine.
"""

import os
import tempfile

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
