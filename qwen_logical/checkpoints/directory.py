"""HF Qwen2 checkpoint directories: find the files, validate everything, read headers only.

A directory holds `config.json` and either `model.safetensors` or
`model.safetensors.index.json` with the shards it names. Everything is checked
(config, index, every file header, every tensor name and shape) before a byte of
tensor data is read; `loader.py` then reads each device's slice from memory maps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from absl import logging

from qwen_logical.checkpoints import safetensors_io
from qwen_logical.checkpoints.hf_names import CheckpointError, tensor_specs
from qwen_logical.model.config import ModelConfig
from qwen_logical.model.hf_config import from_hf_config

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters write that are not parameters.
_IGNORED = re.compile(r".*\.rotary_emb\.inv_freq$")


@dataclasses.dataclass
class Checkpoint:
  """A validated checkpoint: its config and where every tensor the model needs lives."""

  directory: str
  config: ModelConfig
  entries: dict[str, safetensors_io.TensorEntry]
  files: list[str]

  @property
  def nbytes(self) -> int:
    return sum(e.nbytes for e in self.entries.values())

  @property
  def dtypes(self) -> set[str]:
    return {str(e.dtype) for e in self.entries.values()}


def _read_json(path: str, what: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{what} {path} is not valid JSON: {e}") from e


def _tensor_files(directory: str) -> tuple[list[str], dict[str, str] | None]:
  index_path = os.path.join(directory, INDEX_FILE)
  if os.path.exists(index_path):
    index = _read_json(index_path, "index")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
      raise CheckpointError(f"index {index_path} has no 'weight_map'.")
    files = sorted(set(weight_map.values()))
    for name in files:
      if not os.path.exists(os.path.join(directory, name)):
        owners = [t for t, f in weight_map.items() if f == name]
        raise CheckpointError(f"index {index_path} names shard {name}, which is missing from {directory} "
                              f"(it should hold {len(owners)} tensors, e.g. {owners[0]}). Copy the "
                              "complete checkpoint.")
    return [os.path.join(directory, f) for f in files], weight_map
  single = os.path.join(directory, SINGLE_FILE)
  if os.path.exists(single):
    return [single], None
  raise CheckpointError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}; point "
                        "--config.checkpoint at a Hugging Face model directory.")


def open_checkpoint(directory: str, **config_overrides) -> Checkpoint:
  """Validates a checkpoint directory against its config.json; reads headers only."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise CheckpointError(f"checkpoint directory {directory} does not exist.")
  config = from_hf_config(directory, **config_overrides)
  files, weight_map = _tensor_files(directory)
  entries: dict[str, safetensors_io.TensorEntry] = {}
  for path in files:
    for name, entry in safetensors_io.read_header(path).items():
      if name in entries:
        raise CheckpointError(f"tensor {name} appears in both {entries[name].path} and {path}.")
      entries[name] = entry
  if weight_map is not None:
    for name, file in weight_map.items():
      if name not in entries or os.path.basename(entries[name].path) != file:
        raise CheckpointError(f"index {INDEX_FILE} places tensor {name} in {file}, but that file "
                              "does not contain it: the checkpoint is incomplete or mixed up.")
  specs = tensor_specs(config)
  needed = {s.hf_name for s in specs}
  missing = [s.hf_name for s in specs if s.hf_name not in entries]
  if missing:
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    raise CheckpointError(f"{directory} lacks {len(missing)} tensor(s) the config needs: {shown}.")
  extra = sorted(n for n in entries if n not in needed and not _IGNORED.match(n))
  if config.tie_word_embeddings and "lm_head.weight" in extra:
    logging.warning("%s: ignoring lm_head.weight: config.json ties it to the embedding.", directory)
    extra.remove("lm_head.weight")
  if extra:
    raise CheckpointError(f"{directory} has {len(extra)} tensor(s) this Qwen2 model does not use: "
                          f"{', '.join(extra[:5])}. Is config.json from the same model?")
  for spec in specs:
    entry = entries[spec.hf_name]
    if entry.shape != spec.hf_shape:
      raise CheckpointError(f"tensor {spec.hf_name} in {os.path.basename(entry.path)} has shape "
                            f"{entry.shape}, expected {spec.hf_shape} from config.json.")
  return Checkpoint(directory, config, {n: entries[n] for n in needed}, files)
