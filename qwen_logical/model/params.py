"""Declaring parameters and pinning activations by logical axis names (resolved by the bound rule table).

Parameters are declared here with a shape, dtype and logical axes (what the Partitioner traces);
`model.init` itself makes zeros: values come from the hash init (sharding/init.py) or a checkpoint.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen_logical.model import quantization as quant
from qwen_logical.model.config import ModelConfig
from qwen_logical.model.projections import Kernel


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Pins an activation's sharding by logical names (resolved by the bound rule table)."""
  return nn.with_logical_constraint(x, tuple(names))


def logical_param(module: nn.Module, name: str, shape, names, dtype) -> jax.Array:
  """module.param `name` annotated with logical axis `names` (one per dimension of `shape`); zeros
  at init (values come from sharding/init.py or a checkpoint)."""
  zeros = nn.with_logical_partitioning(nn.initializers.zeros, tuple(names))
  return module.param(name, zeros, tuple(shape), dtype)


def kernel_param(module: nn.Module, name: str, shape, names, config: ModelConfig) -> Kernel:
  """A weight kernel `name` [out..., in...] as stored: (kernel in param_dtype, None), or with int8
  quantization (config.quantization) (int8 kernel, `<name>_scale` f32[out...]) whose scale carries the
  output dimensions' logical axes. Declared as logical_param (zeros; values from sharding.init)."""
  if not quant.is_quantized(name, config.quantization):
    return logical_param(module, name, shape, names, config.param_dtype), None
  contracted = quant.contracted_axes(name)
  kernel = logical_param(module, name, shape, names, jnp.int8)
  scale = logical_param(module, quant.scale_name(name), quant.output_part(shape, contracted),
                        quant.output_part(names, contracted), jnp.float32)
  return kernel, scale
