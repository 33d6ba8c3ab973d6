"""Process 0's decisions, sent to every other process so all run the same programs in the same order.

Process 0 runs the scheduler; before each program call it sends the call (`Call`: the program and
its host arguments) and then runs it; every other process receives the call and runs it too
(`Engine.follow`). A call is one fixed-size int32 message (broadcast_one_to_all, so it compiles
once): [op, sampler kind, b, P] then every per-row field in a block of R entries (floats and
seeds bit-cast) and the rows' stop ids in a block of R x STOP_SLOTS; a PREFILL sends its prompts
as a second fixed-size message int32[B_max, S].
While idle, process 0 sends NOOP every `keepalive_s` seconds, so a dead peer shows up as a failed
collective within seconds (`distributed.exit_on_peer_failure` then ends the process).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from qwen_logical.inference.batch_plan import STOP_SLOTS
from qwen_logical.inference.sampling import KINDS, SAMPLE

NOOP, PREFILL, DECODE, RESET, STOP = range(5)
FIELDS = {"tokens": np.int32, "index": np.int32, "seeds": np.uint32, "streams": np.int32, "steps": np.int32,
          "budget": np.int32, "lengths": np.int32, "rows": np.int32, "temperature": np.float32, "top_k": np.int32,
          "top_p": np.float32}
PREFILL_FIELDS = ("lengths", "rows", "seeds", "streams", "temperature", "top_k", "top_p")  # + tokens int[b, P]
DECODE_FIELDS = ("tokens", "index", "seeds", "streams", "steps", "budget", "temperature", "top_k", "top_p")
# + stops int[n, STOP_SLOTS]: together the fields of programs.RowState
_HEADER = 4


@dataclasses.dataclass
class Call:
  """One program call: `op`, the decode sampler `kind`, and the host arrays of its arguments
  (PREFILL: tokens int[b, P] and PREFILL_FIELDS [b]; DECODE: DECODE_FIELDS [n], cache rows [0, n))."""

  op: int
  kind: str = SAMPLE
  arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  limit: int = 0  # DECODE: at most this many steps in the dispatch (0: the program's K)


class Channel:
  """Sends calls from process 0 and receives them elsewhere; with one process, sends nothing.

  rows: R, the longest per-row array (decode rows N, or the largest prefill batch).
  prompt_shape: (B_max, S), the largest prefill's prompts.
  """

  def __init__(self, rows: int, prompt_shape: tuple[int, int]):
    self.rows, self.prompt_shape = rows, prompt_shape
    self._stops_at = _HEADER + len(FIELDS) * rows
    self.size = self._stops_at + rows * STOP_SLOTS

  @property
  def needed(self) -> bool:
    return jax.process_count() > 1

  def send(self, call: Call) -> None:
    """Process 0: sends `call` to every other process (a collective: they must be receiving)."""
    if not self.needed:
      return
    _broadcast(self.encode(call))
    if call.op == PREFILL:
      prompts = np.zeros(self.prompt_shape, np.int32)
      tokens = call.arrays["tokens"]
      prompts[:tokens.shape[0], :tokens.shape[1]] = tokens
      _broadcast(prompts)

  def receive(self) -> Call:
    """Every other process: the next call of process 0."""
    call = self.decode(_broadcast(np.zeros(self.size, np.int32)))
    if call.op == PREFILL:
      batch, bucket = call.arrays["tokens"].shape
      call.arrays["tokens"] = _broadcast(np.zeros(self.prompt_shape, np.int32))[:batch, :bucket]
    return call

  def encode(self, call: Call) -> np.ndarray:
    message = np.zeros(self.size, np.int32)
    batch = bucket = 0
    if call.op == PREFILL:
      batch, bucket = call.arrays["tokens"].shape
    elif call.op == DECODE:
      batch, bucket = len(call.arrays["tokens"]), call.limit  # a decode has no bucket: its step limit
    message[:_HEADER] = (call.op, KINDS.index(call.kind), batch, bucket)
    for i, (name, dtype) in enumerate(FIELDS.items()):
      values = call.arrays.get(name)
      if values is not None and values.ndim == 1:
        start = _HEADER + i * self.rows
        message[start:start + len(values)] = np.asarray(values, dtype).view(np.int32)
    stops = call.arrays.get("stops")
    if stops is not None:
      message[self._stops_at:self._stops_at + stops.size] = stops.reshape(-1)
    return message

  def decode(self, message: np.ndarray) -> Call:
    """The call of a message; a PREFILL's tokens are zeros of their shape until its prompts come."""
    op, kind, batch, bucket = (int(v) for v in message[:_HEADER])
    names = PREFILL_FIELDS if op == PREFILL else DECODE_FIELDS if op == DECODE else ()
    arrays = {}
    for i, (name, dtype) in enumerate(FIELDS.items()):
      if name in names:
        start = _HEADER + i * self.rows
        arrays[name] = message[start:start + batch].copy().view(dtype)
    if op == PREFILL:
      arrays["tokens"] = np.zeros((batch, bucket), np.int32)
    if op == DECODE:
      arrays["stops"] = message[self._stops_at:self._stops_at + batch * STOP_SLOTS].reshape(batch, STOP_SLOTS).copy()
    return Call(op, KINDS[kind], arrays, limit=bucket if op == DECODE else 0)


def _broadcast(array: np.ndarray) -> np.ndarray:
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.broadcast_one_to_all(array))
