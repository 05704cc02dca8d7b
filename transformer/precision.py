"""Mixed precision: every matrix product's inputs in the compute dtype, its sums in float32.

config.dtype=bfloat16 casts the two inputs of each product (dense layers, attention's two
einsums, the output layer) to bfloat16 and asks for a float32 result (preferred_element_type),
in the backward pass as in the forward. Everything else stays float32: parameters, activations
between products, softmax, norms, the loss and the optimizer. Decoding's key/value caches are
held in the compute dtype (attention.py), and einsum reads an input already in it as it is.
Accumulating in float32 is how TPUs and GPUs run bfloat16, and it is what XLA:CPU's fast
bfloat16 path needs: on a CPU with AMX or AVX512-BF16 a bfloat16 product with a bfloat16 result
runs slower than float32, one with a float32 result several times faster.

dtype=float32 leaves every product as plain jnp.einsum. dtype=auto (the configs' default,
compute_dtype) takes bfloat16 where this machine multiplies bfloat16 matrices at least
AUTO_MIN_SPEEDUP times faster than float32 ones, measured at start-up, and float32 elsewhere.
"""

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

Array = jnp.ndarray


def einsum(spec: str, a: Array, b: Array, dtype) -> Array:
  """jnp.einsum(spec, a, b), its inputs in `dtype` and its sums and result float32 when `dtype`
  is narrower than float32. spec names each axis once per operand, no ellipsis, and every axis
  of an input appears in the other input or the output (no axis summed within one input)."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return jnp.einsum(spec, a, b)
  # An input already in `dtype` (a decoding cache held narrow) goes in as it is: an upcast to
  # float32 here and a downcast inside would copy it at every use. Any other input goes in as
  # float32, so that its cotangent comes back float32, as the rest of the model is.
  widen = lambda x: x if x.dtype == dtype else x.astype(jnp.float32)
  a, b = widen(a), widen(b)
  return _mixed_einsum(spec, dtype, (a.dtype, b.dtype), a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _mixed_einsum(spec, dtype, input_dtypes, a, b):
  return _mixed_einsum_forward(spec, dtype, input_dtypes, a, b)[0]


def _mixed_einsum_forward(spec, dtype, input_dtypes, a, b):
  del input_dtypes  # the backward pass's
  a_n, b_n = a.astype(dtype), b.astype(dtype)  # kept narrow for the backward pass
  inputs, out_spec = spec.split('->')
  a_spec, b_spec = inputs.split(',')
  return _narrow_product(a_spec, a_n, b_spec, b_n, out_spec), (a_n, b_n)


def _mixed_einsum_backward(spec, dtype, input_dtypes, saved, g):
  # Without this rule JAX's own transposes would multiply the float32 cotangent with a narrow
  # input: a float32 product, the slow path. Here both backward products are narrow too.
  a_n, b_n = saved
  inputs, out = spec.split('->')
  a_spec, b_spec = inputs.split(',')
  g_n = g.astype(dtype)
  return (_narrow_product(out, g_n, b_spec, b_n, a_spec).astype(input_dtypes[0]),
          _narrow_product(a_spec, a_n, out, g_n, b_spec).astype(input_dtypes[1]))


def _narrow_product(x_spec: str, x: Array, y_spec: str, y: Array, out_spec: str) -> Array:
  """einsum(x_spec,y_spec->out_spec) of narrow inputs with a float32 result.

  XLA:CPU runs a batched narrow product only where an operand holds the summed axes last (here
  always the left one); otherwise it fails ("Unsupported element type for DotThunk: BF16 x BF16
  = F32"). Attention's backward pass has two such products, the gradients of its keys (dS^T Q)
  and of its values (P^T dO): they sum over the query axis, last in neither operand. On the CPU
  backend the smaller operand of such a product is transposed to hold the summed axes last, in
  memory: behind an optimization barrier, as XLA would otherwise fold the transpose back into
  the product.

  It fails too where XLA folds a transpose of the result into the product's output layout, as it
  did for grouped-query attention's sum of the values over a decoding cache. So on the CPU
  backend a batched product's result comes out in the product's own order (batch axes, then the
  left operand's, then the right one's), behind a barrier, and is transposed after it.
  """
  summed = ''.join(c for c in x_spec if c in y_spec and c not in out_spec)
  batch = ''.join(c for c in x_spec if c in y_spec and c in out_spec)
  if not batch or jax.default_backend() != 'cpu':
    return jnp.einsum(f'{x_spec},{y_spec}->{out_spec}', x, y, preferred_element_type=jnp.float32)
  summed_last = lambda spec: spec.endswith(''.join(c for c in spec if c in summed))
  if not summed_last(x_spec):
    if not summed_last(y_spec):
      if y.size < x.size:
        x_spec, x, y_spec, y = y_spec, y, x_spec, x
      moved = ''.join(c for c in x_spec if c not in summed) + summed
      x = jax.lax.optimization_barrier(jnp.einsum(f'{x_spec}->{moved}', x))
      x_spec = moved
    else:
      x_spec, x, y_spec, y = y_spec, y, x_spec, x
  free = lambda spec: ''.join(c for c in spec if c not in batch and c not in summed)
  own = batch + free(x_spec) + free(y_spec)
  z = jnp.einsum(f'{x_spec},{y_spec}->{own}', x, y, preferred_element_type=jnp.float32)
  return z if own == out_spec else jnp.einsum(f'{own}->{out_spec}',
                                              jax.lax.optimization_barrier(z))


_mixed_einsum.defvjp(_mixed_einsum_forward, _mixed_einsum_backward)


def dense_product(dtype):
  """nn.Dense's dot_general (inputs [..., N] x kernel [N, F]) through einsum in `dtype`; None
  (flax's own) for float32."""
  if jnp.dtype(dtype) == jnp.float32:
    return None

  def product(inputs, kernel, dimension_numbers, precision=None):
    del dimension_numbers, precision  # Dense's: inputs' last axis x the kernel's first
    batch = 'abcdefgh'[:inputs.ndim - 1]
    return einsum(f'{batch}n,nf->{batch}f', inputs, kernel, dtype)

  return product


# One compiled program per shape, dtype and sharding, whichever measurement asks for it.
_square = jax.jit(lambda m: jnp.matmul(m, m, preferred_element_type=jnp.float32))


def _matmul_flops_per_s(devices, size: int, dtype, repeats: int) -> float:
  """FLOP/s of one large jitted matmul per device in `devices`, all at once (best of repeats)."""
  mesh = jax.sharding.Mesh(devices, ('d',))
  x = jax.device_put(jax.random.normal(jax.random.key(0), (len(devices), size, size), dtype),
                     jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('d')))
  # Narrow inputs accumulate in float32, as the model's products do.
  _square(x).block_until_ready()  # compile
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    _square(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 * len(devices) / best


def measure_matmul_peak(size: int = 2048, dtype=jnp.float32, repeats: int = 5) -> float:
  """The denominator of MFU: FLOP/s of large jitted matmuls of `dtype` inputs (float32
  accumulation) on this process's devices; MFU is taken against the peak of the dtype that ran.

  The larger of one matmul on every local device at once and one on the first device alone:
  fake CPU devices share the same cores, and on them either way can be the faster (one device
  uses all cores for its matmul), so the peak never depends on how the host was split.
  """
  devices = jax.local_devices()
  together = _matmul_flops_per_s(devices, size, dtype, repeats)
  if len(devices) == 1 or devices[0].platform != 'cpu':
    return together
  return max(together, _matmul_flops_per_s(devices[:1], size, dtype, repeats))


DTYPES = ('auto', 'float32', 'bfloat16')
# dtype=auto takes bfloat16 from this measured speed-up of its matmuls over float32's on. Where
# the hardware has bfloat16 matrix units it is 2-4x (AMX and AVX512-BF16 CPUs, TPUs, GPUs from
# Ampere on, against TF32); where it has none, bfloat16 is converted and runs slower (< 1x).
AUTO_MIN_SPEEDUP = 1.5
AUTO_ROUNDS = 3  # measurements of each dtype, in turn; the best of each counts


def _bfloat16_speedup(rounds: int = AUTO_ROUNDS) -> float:
  """bfloat16 matmuls' FLOP/s over float32's on this process's first device (one device
  suffices for a ratio): the best of `rounds` measurements of each, taken in turn. The first
  products a process runs are slow (threads and caches still cold: a single cold measurement
  once made bfloat16 look 0.9x float32 on a CPU where it runs 2x), and taking turns keeps a
  passing slow phase of the machine from falling on one dtype alone."""
  device = jax.local_devices()[:1]
  best = {jnp.bfloat16: 0.0, jnp.float32: 0.0}
  for _ in range(rounds):
    for dtype in best:
      best[dtype] = max(best[dtype], _matmul_flops_per_s(device, 1024, dtype, repeats=3))
  return best[jnp.bfloat16] / best[jnp.float32]


@functools.cache
def compute_dtype(name: str) -> jnp.dtype:
  """config.dtype -> the dtype of the products' inputs. 'auto' measures both matmul peaks on
  this process's first device (a fraction of a second); in a run of several processes, process
  0's choice holds for all, so that every process compiles the same program."""
  if name not in DTYPES:
    raise ValueError(f'dtype must be one of {", ".join(DTYPES)}, got {name!r}')
  if name != 'auto':
    return jnp.dtype(name)
  speedup = _bfloat16_speedup()
  narrow = speedup >= AUTO_MIN_SPEEDUP
  if jax.process_count() > 1:
    narrow = bool(multihost_utils.broadcast_one_to_all(np.asarray(narrow)))
  chosen = jnp.dtype(jnp.bfloat16 if narrow else jnp.float32)
  logging.info('dtype=auto: %s (bfloat16 matmuls measured %.2fx as fast as float32 here; '
               'bfloat16 from %.1fx).', chosen.name, speedup, AUTO_MIN_SPEEDUP)
  return chosen
