"""One process of a multi-process job on simulated CPU devices (started by test_distributed.py).

  python distributed_worker.py PORT NUM_PROCESSES PROCESS_ID CHECKPOINT OUT_PREFIX MODE

MODE "run": for each mesh in MESHES, loads CHECKPOINT across the processes, runs the
forward pass and greedy generation, and writes OUT_PREFIX-<mesh>-<process id>.npz; then
exports the last mesh's params to OUT_PREFIX-export.
MODE "loop": after one run, prints READY and keeps generating (the peer-death test).
"""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qwen_logical.sharding.mesh import simulate_cpu_devices  # noqa: E402

MESHES = ("2x4", "1x8")
TOKENS = np.random.RandomState(11).randint(0, 160, (8, 10))
PROMPTS = [row[:n].tolist() for row, n in zip(TOKENS, (4, 5, 6, 7, 8, 9, 10, 10))]
NEW_TOKENS = 8
HEARTBEAT_S = 5


def main(port, num_processes, process_id, checkpoint, out_prefix, mode):
  num_processes, process_id = int(num_processes), int(process_id)
  simulate_cpu_devices(8 // num_processes)
  import jax
  jax.config.update("jax_platforms", "cpu")
  from qwen_logical.sharding import distributed
  distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id, cpu=True,
                         initialization_timeout_s=60, heartbeat_timeout_s=HEARTBEAT_S)
  from qwen_logical.checkpoints.loader import load_checkpoint
  from qwen_logical.inference.generate import generate
  from qwen_logical.sharding.mesh import make_mesh
  from qwen_logical.sharding.rules import get_table

  for mesh in MESHES if mode == "run" else MESHES[:1]:
    params, _, part = load_checkpoint(checkpoint, make_mesh(mesh), get_table("tensor_parallel"), progress=False)
    logits = distributed.to_host(part.forward(params, TOKENS))
    tokens = generate(part, params, PROMPTS, max_new_tokens=NEW_TOKENS).tokens
    local_bytes = sum(s.data.nbytes for a in jax.tree_util.tree_leaves(params) for s in a.addressable_shards)
    np.savez(f"{out_prefix}-{mesh}-{process_id}.npz", logits=logits, tokens=np.array(tokens),
             local_bytes=local_bytes, local_devices=jax.local_device_count(), devices=jax.device_count())
  if mode == "run":  # every process takes part in the export; process 0 writes
    from qwen_logical.checkpoints.export import export_checkpoint
    export_checkpoint(params, part, f"{out_prefix}-export", progress=False)
  if mode == "loop":
    print("READY", flush=True)
    while True:  # every step needs both processes; a dead peer must end this with an error
      distributed.exit_on_peer_failure(generate, part, params, PROMPTS, max_new_tokens=NEW_TOKENS)


if __name__ == "__main__":
  main(*sys.argv[1:])
