"""What main.py calls: pick the job, set up its devices, run it, write its report, turn the outcome
into an exit status (0 ok, 1 the job reports a failure, 2 a user mistake, 3 a peer process died)."""

from __future__ import annotations

import json
import sys
import traceback
from typing import Any

from absl import logging
from ml_collections import ConfigDict

from qwen_logical.common.errors import QwenLogicalError
from qwen_logical.jobs import finetune, run, serve
from qwen_logical.jobs.common.build import JobError
from qwen_logical.jobs.common.devices import setup_devices
from qwen_logical.jobs.verify import job as verify
from qwen_logical.jobs.verify_large import job as verify_large
from qwen_logical.sharding import distributed
from qwen_logical.sharding.programs import enable_compilation_cache

# name -> module with devices_needed(config) -> int and main(config) -> JSON report (report["ok"]).
JOBS = {"run": run, "verify": verify, "verify_large": verify_large, "serve": serve, "finetune": finetune}
USER_ERROR_EXIT_CODE = 2


def run_job(config: ConfigDict) -> dict[str, Any]:
  """Runs the job `config.job` names; writes --config.report (process 0); returns the report."""
  job = JOBS.get(config.job)
  if job is None:
    raise JobError(f"--config.job={config.job!r}: use 'run' (one mesh and table), 'verify' "
                   "(the verification suite, configs/verify.py), 'verify_large' (a process per "
                   "combination within host memory, configs/verify_7b.py), 'serve' (the OpenAI-compatible "
                   "server, configs/serve.py) or 'finetune' (configs/finetune.py).")
  setup_devices(config, job.devices_needed(config))
  if enable_compilation_cache(config.compilation_cache_dir):
    logging.info("XLA compilation cache: %s (--config.compilation_cache_dir; empty turns it off)",
                 config.compilation_cache_dir)
  report = job.main(config)
  if config.report and distributed.is_main_process():
    with open(config.report, "w") as f:
      json.dump(report, f, indent=1, default=str)
    logging.info("Wrote report to %s", config.report)
  return report


def exit_status(config: ConfigDict, show_traceback: bool = False) -> int:
  """Runs the job; the process exit status.

  A user mistake (QwenLogicalError) prints one line-led message, "error: ...", on stderr (with
  its traceback only when `show_traceback`); anything else is a bug and propagates with its
  traceback. A dead peer process ends this one at once (sharding.distributed.exit_on_peer_failure).
  """
  try:
    report = distributed.exit_on_peer_failure(run_job, config)
  except QwenLogicalError as error:
    if show_traceback:
      traceback.print_exc()
    print(f"error: {error}", file=sys.stderr, flush=True)
    return USER_ERROR_EXIT_CODE
  return 0 if report.get("ok", True) else 1
