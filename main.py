"""qwen_logical main job: python main.py --config=configs/tp8.py [--config.mesh=2x4 ...]."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tp8.py", "Run config (see configs/).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  from qwen_logical.sharding.distributed import exit_on_peer_failure
  from qwen_logical.jobs.run import run
  if not exit_on_peer_failure(run, _CONFIG.value).get("ok", True):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
