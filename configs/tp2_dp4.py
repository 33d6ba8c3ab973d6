"""2-way tensor parallelism, 4-way data parallelism: mesh 4x2 (batch x model), rule table tensor_parallel."""

from configs import base


def get_config():
  config = base.get_config()
  config.mesh = "4x2"
  config.rules = "tensor_parallel"
  return config
