"""What every use of a model is built from: its config, tokenizer, device mesh and Flax module.

Using a trained model (eval, translate, generate, fill_mask, visualize, export) needs this and the
parameters alone, which `checkpoint.Checkpointer.restore_params` reads without the optimizer
state. Training adds an optimizer and validation batches on top (`train.Experiment`).
"""

import flax.linen as nn
import jax

from transformer import config_checks, data, objectives, sharding, variants


def abstract_tree(boxed, mesh):
  """(tree of jax.ShapeDtypeStruct carrying shardings, the shardings) of an abstract tree whose
  leaves may be nn.Partitioned boxes (jax.eval_shape of an init): a layout to restore or
  initialise into, allocating nothing."""
  shardings = sharding.tree_shardings(boxed, mesh)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          nn.unbox(boxed), shardings)
  return abstract, shardings


def abstract_params(model, config, mesh):
  """(abstract parameters with shardings, their shardings) of `model`, allocating nothing."""
  example = variants.example_batch(config)
  boxed = jax.eval_shape(lambda: objectives.init_params(model, example, jax.random.key(0)))
  return abstract_tree(boxed, mesh)


class ModelContext:
  """The tokenizer, mesh and model of a config (checked first): no optimizer, no data loaded."""

  def __init__(self, config):
    config_checks.check(config)
    self.config = config
    self.tokenizer = data.get_tokenizer(config)
    self.mesh = sharding.make_mesh(config)
    self.model = variants.build_model(config, self.tokenizer.vocab_size)

  def abstract_params(self):
    return abstract_params(self.model, self.config, self.mesh)
