"""Megatron tensor parallelism over 8 devices: mesh 1x8 (batch x model), rule table tensor_parallel."""

from configs import base


def get_config():
  config = base.get_config()
  config.mesh = "1x8"
  config.rules = "tensor_parallel"
  return config
