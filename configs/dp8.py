"""pure data parallelism over 8 devices: mesh 8x1 (batch x model), rule table data_parallel."""

from configs import base


def get_config():
  config = base.get_config()
  config.mesh = "8x1"
  config.rules = "data_parallel"
  return config
