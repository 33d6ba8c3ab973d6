"""One process of a 2-process serving job on simulated CPU devices (started by test_serving_engine.py).

  python serving_worker.py PORT PROCESS_ID CHECKPOINT OUT

Both processes load CHECKPOINT on a 1x8 tensor-parallel mesh (4 devices each) and build the same
Engine. Process 0 serves the SHARDED requests, writes their tokens to OUT.npz and prints a line,
then serves a second wave; process 1 follows (`engine.follow()`) until OUT.npz exists, then kills
itself, so process 0 must end with the peer-failure exit (3) instead of hanging.
The constants below are the test's requests (importing this module starts nothing).
"""

import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SLOTS, CONTEXT, MODEL_SEED = 4, 32, 1
SHARDED_SLOTS = 2  # the sharded engines: every prefill batch is 2 (or 1) rows, the rows are reused
_LENGTHS = (5, 12, 3, 9, 14, 7, 16, 2, 20, 27, 18, 24, 11, 30, 22, 8)
_NEW = (20, 9, 29, 14, 1, 25, 16, 6, 12, 5, 3, 8, 21, 2, 10, 17)
_SAMPLING = ((0.0, 0, 1.0), (0.0, 0, 1.0), (1.5, 0, 1.0), (2.0, 20, 1.0),
             (0.0, 0, 1.0), (0.0, 0, 1.0), (1.5, 0, 1.0), (1.5, 0, 0.95))
COMPARED_WITH_GENERATE = (2, 3)  # a SAMPLE and a FILTERED request, both in prompt bucket 16
SHARDED = (0, 1, 2, 3, 5, 7)  # prompts of bucket 16: greedy, sampled and filtered
HEARTBEAT_S = 30  # the keepalive finds a dead peer first; a short heartbeat could race it on a loaded machine


def _requests():
  import numpy as np
  from qwen_logical.inference.sampling import SamplingParams
  from qwen_logical.serving.requests import EngineRequest
  rng = np.random.RandomState(5)
  return tuple(EngineRequest(tuple(int(t) for t in rng.randint(0, 256, n)), new, SamplingParams(*_SAMPLING[i % 8]),
                             seed=100 + i) for i, (n, new) in enumerate(zip(_LENGTHS, _NEW)))


REQUESTS = _requests()


def _serve(engine, requests):
  """Submits `requests`, waits for their final events; their tokens."""
  tokens, done, cv = {}, {}, threading.Condition()

  def callback(event):
    with cv:
      if event.token is not None:
        tokens.setdefault(event.request_id, []).append(event.token)
      if event.finish_reason is not None:
        done[event.request_id] = event
        cv.notify_all()

  rids = [engine.submit(r, callback) for r in requests]
  with cv:
    cv.wait_for(lambda: all(r in done for r in rids), 200)
  return [tokens.get(r, []) for r in rids]


def _die_when(path):
  while not os.path.exists(path):
    time.sleep(0.05)
  os.kill(os.getpid(), signal.SIGKILL)


def main(port, process_id, checkpoint, out):
  process_id = int(process_id)
  from qwen_logical.sharding.mesh import simulate_cpu_devices
  simulate_cpu_devices(4)
  import jax
  jax.config.update("jax_platforms", "cpu")
  import numpy as np
  from qwen_logical.sharding import distributed
  distributed.initialize(f"127.0.0.1:{port}", 2, process_id, cpu=True, initialization_timeout_s=60,
                         heartbeat_timeout_s=HEARTBEAT_S)
  from qwen_logical.checkpoints.loader import load_checkpoint
  from qwen_logical.serving.engine import Engine
  from qwen_logical.sharding.mesh import make_mesh
  from qwen_logical.sharding.rules import get_table

  params, _, part = load_checkpoint(checkpoint, make_mesh("1x8"), get_table("tensor_parallel"), progress=False)
  engine = Engine(part, params, slots=SHARDED_SLOTS, context=CONTEXT, keepalive_s=0.5)
  if process_id != 0:
    threading.Thread(target=_die_when, args=(out + ".npz",), daemon=True).start()
    engine.follow()
    return
  engine.start()
  served = _serve(engine, [REQUESTS[i] for i in SHARDED])
  np.savez(out + ".tmp.npz", devices=jax.device_count(), local_devices=jax.local_device_count(),
           **{f"r{i}": np.array(t) for i, t in zip(SHARDED, served)})
  os.rename(out + ".tmp.npz", out + ".npz")
  print("WAVE1", flush=True)
  _serve(engine, REQUESTS[:2])  # the follower is gone: this must end the process with exit code 3
  print("SECOND WAVE SERVED WITHOUT THE FOLLOWER", flush=True)
  engine.stop(0)


if __name__ == "__main__":
  main(*sys.argv[1:])
