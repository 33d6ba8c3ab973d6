"""one device (the reference run): mesh 1x1 (batch x model), rule table tensor_parallel."""

from configs import base


def get_config():
  config = base.get_config()
  config.mesh = "1x1"
  config.rules = "tensor_parallel"
  return config
