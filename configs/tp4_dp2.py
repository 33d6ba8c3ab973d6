"""4-way tensor parallelism, 2-way data parallelism: mesh 2x4 (batch x model), rule table tensor_parallel."""

from configs import base


def get_config():
  config = base.get_config()
  config.mesh = "2x4"
  config.rules = "tensor_parallel"
  return config
