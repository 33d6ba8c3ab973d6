"""qwen_logical main job: python main.py --config=configs/tp8.py [--config.mesh=2x4 ...].

Exit status: 0 ok, 1 the job reports a failure (verification), 2 a mistake in what was asked
for (printed as one "error: ..." message; --traceback or -v 1 adds the traceback), 3 another
process of a multi-process job died. Any other error is a bug and shows its traceback.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tp8.py", "Run config (see configs/).")
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the traceback of a user error too (so does -v 1).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if logging.get_verbosity() < logging.INFO:
    logging.set_verbosity(logging.INFO)
  from qwen_logical.jobs.entry import exit_status
  sys.exit(exit_status(_CONFIG.value, show_traceback=_TRACEBACK.value or logging.get_verbosity() >= 1))


if __name__ == "__main__":
  app.run(main)
