"""Process 0's decisions, sent to every other process so all run the same programs in the same order.

Process 0 runs the scheduler; before each program call it sends the call (`Call`: the program and
its host arguments) and then runs it; every other process receives the call and runs it too
(`Engine.follow`). A call is one fixed-size int32 message (broadcast_one_to_all, so it compiles
once): [op, sampler kind, b, P or the step limit, flag] then every per-row field in a block of R
entries (floats and seeds bit-cast), the rows' stop ids in a block of R x STOP_SLOTS and each RowExtras field in a
block of R x its width; a PREFILL or EXTEND sends its prompts as a second fixed-size message
int32[B_max, S].
While idle, process 0 sends NOOP every `keepalive_s` seconds, so a dead peer shows up as a failed
collective within seconds (`distributed.exit_on_peer_failure` then ends the process).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from qwen_logical.inference.batch_plan import STOP_SLOTS
from qwen_logical.inference.logit_processing import RowExtras
from qwen_logical.inference.sampling import KINDS, SAMPLE

NOOP, PREFILL, DECODE, RESET, STOP, EXTEND, COPY = range(7)
ROW_FIELDS = {"tokens": np.int32, "index": np.int32, "seeds": np.uint32, "streams": np.int32, "steps": np.int32,
              "budget": np.int32, "lengths": np.int32, "starts": np.int32, "rows": np.int32,
              "temperature": np.float32, "top_k": np.int32, "top_p": np.float32}
PREFILL_FIELDS = ("lengths", "rows", "seeds", "streams", "temperature", "top_k", "top_p")  # + tokens int[b, P]
EXTEND_FIELDS = ("starts",) + PREFILL_FIELDS[1:]
DECODE_FIELDS = ("tokens", "index", "seeds", "streams", "steps", "budget", "temperature", "top_k", "top_p")
# + stops int[n, STOP_SLOTS]: together the fields of programs.RowState; every call but COPY also
# carries the fields of logit_processing.RowExtras.
EXTRA_FIELDS = tuple(f.name for f in dataclasses.fields(RowExtras))
_HEADER = 5


@dataclasses.dataclass
class Call:
  """One program call: `op`, the sampler `kind`, and the host arrays of its arguments (PREFILL:
  tokens int[b, P] and PREFILL_FIELDS [b]; EXTEND: the same with EXTEND_FIELDS; DECODE:
  DECODE_FIELDS [n], cache rows [0, n); each with stops and EXTRA_FIELDS; COPY: src and dst in `limit`
  and `flag`)."""

  op: int
  kind: str = SAMPLE
  arrays: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  limit: int = 0  # DECODE: at most this many steps in the dispatch (0: the program's K); COPY: the source row
  flag: int = 0  # PREFILL: 1 = echo (the prompt's log-probabilities too); EXTEND: its bucket P;
  # DECODE: 1 = plain steps, never speculative rounds; COPY: the destination row


class Channel:
  """Sends calls from process 0 and receives them elsewhere; with one process, sends nothing.

  rows: R, the longest per-row array (decode rows N, or the largest prefill batch).
  prompt_shape: (B_max, S), the largest prefill's prompts. vocab_size: the model's (mask words).
  """

  def __init__(self, rows: int, prompt_shape: tuple[int, int], vocab_size: int):
    self.rows, self.prompt_shape = rows, prompt_shape
    widths = {name: 1 for name in ROW_FIELDS}
    empty = RowExtras.empty(1, vocab_size)
    widths.update({name: getattr(empty, name).size for name in EXTRA_FIELDS}, stops=STOP_SLOTS)
    self._dtypes = {**ROW_FIELDS, "stops": np.int32, **{n: getattr(empty, n).dtype for n in EXTRA_FIELDS}}
    self._at, offset = {}, _HEADER
    for name, width in widths.items():
      self._at[name] = (offset, width)
      offset += rows * width
    self.size = offset

  @property
  def needed(self) -> bool:
    return jax.process_count() > 1

  def send(self, call: Call) -> None:
    """Process 0: sends `call` to every other process (a collective: they must be receiving)."""
    if not self.needed:
      return
    _broadcast(self.encode(call))
    if call.op in (PREFILL, EXTEND):
      prompts = np.zeros(self.prompt_shape, np.int32)
      tokens = call.arrays["tokens"]
      prompts[:tokens.shape[0], :tokens.shape[1]] = tokens
      _broadcast(prompts)

  def receive(self) -> Call:
    """Every other process: the next call of process 0."""
    call = self.decode(_broadcast(np.zeros(self.size, np.int32)))
    if call.op in (PREFILL, EXTEND):
      batch, bucket = call.arrays["tokens"].shape
      call.arrays["tokens"] = _broadcast(np.zeros(self.prompt_shape, np.int32))[:batch, :bucket]
    return call

  def encode(self, call: Call) -> np.ndarray:
    message = np.zeros(self.size, np.int32)
    batch = bucket = 0
    if call.op in (PREFILL, EXTEND):
      batch, bucket = call.arrays["tokens"].shape
    elif call.op == DECODE:
      batch = len(call.arrays["tokens"])
    size = bucket if call.op in (PREFILL, EXTEND) else call.limit  # DECODE: the step limit; COPY: the source row
    message[:_HEADER] = (call.op, KINDS.index(call.kind), batch, size, call.flag)
    for name, values in call.arrays.items():
      if name == "tokens" and call.op in (PREFILL, EXTEND):
        continue  # the prompts follow in their own message
      start, width = self._at[name]
      flat = np.asarray(values, self._dtypes[name]).reshape(-1).view(np.int32)
      message[start:start + flat.size] = flat
    return message

  def decode(self, message: np.ndarray) -> Call:
    """The call of a message; a PREFILL's tokens are zeros of their shape until its prompts come."""
    op, kind, batch, size, flag = (int(v) for v in message[:_HEADER])
    names = {PREFILL: PREFILL_FIELDS, EXTEND: EXTEND_FIELDS, DECODE: DECODE_FIELDS}.get(op, ())
    arrays = {}
    for name in names + (("stops",) + EXTRA_FIELDS if names else ()):
      start, width = self._at[name]
      values = message[start:start + batch * width].copy().view(self._dtypes[name])
      arrays[name] = values.reshape(batch, width) if width > 1 or name == "stops" else values
    if op in (PREFILL, EXTEND):
      arrays["tokens"] = np.zeros((batch, size), np.int32)
    return Call(op, KINDS[kind], arrays, limit=size if op in (DECODE, COPY) else 0, flag=flag)


def _broadcast(array: np.ndarray) -> np.ndarray:
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.broadcast_one_to_all(array))
