"""launch/benchmark_peers.py compares like with like: each Hugging Face peer has this project's
model size at its shape (the dims are written twice, once per implementation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import bert_mlm, original
from launch import benchmark_peers
from transformer import variants

CONFIGS = {'configs/original.py': original, 'configs/bert_mlm.py': bert_mlm}


def our_parameter_count(shape):
  path, size = shape.config.split(':')
  config = CONFIGS[path].get_config(size)
  config.update(shape.overrides)
  model = variants.build_model(config, benchmark_peers.VOCAB)
  ids = jnp.ones((1, 8), jnp.int32)
  inputs = (ids, ids) if config.variant == 'original' else (ids,)  # encoder-decoder: two sides
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))['params']
  return sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))


@pytest.mark.parametrize('shape, build', [('encdec', benchmark_peers.marian_model),
                                          ('bert', benchmark_peers.bert_model)])
def test_each_hugging_face_peer_is_this_projects_model_size(shape, build):
  theirs = sum(p.numel() for p in build().parameters())
  ours = our_parameter_count(benchmark_peers.SHAPES[shape])
  # What differs is small and named in the docstrings: biases, position tables, MLM transform.
  assert abs(theirs - ours) / ours < 0.01, (theirs, ours)
