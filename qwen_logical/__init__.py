"""qwen_logical: Qwen2 / Qwen2.5 in Flax with logical-axis sharding rules.

One model definition, annotated with logical axis names (`qwen_logical.axes`),
runs on any ('batch', 'model') mesh under any rule table (`qwen_logical.rules`).

    import qwen_logical as ql
    ql.simulate_cpu_devices(8)            # before JAX starts, on a laptop
    cfg = ql.preset("qwen2.5-0.5b")
    part = ql.Partitioner(cfg, ql.make_mesh("1x8"), ql.get_table("tensor_parallel"))
    params = part.init(seed=0)            # created directly in shards
    print(ql.sharding_report(part, params).format())
    logits = part.forward(params, tokens)

    # A Hugging Face directory straight into shards, and back out:
    params, cfg, part = ql.load_checkpoint("/path/to/Qwen2.5-7B-Instruct", mesh, table)
    ql.export_checkpoint(params, part, "/tmp/exported")
"""

from qwen_logical.model import axes
from qwen_logical.model.config import PRESETS, ConfigError, ModelConfig, as_dtype, preset
from qwen_logical.model.hf_config import from_hf_config, to_hf_config
from qwen_logical.model.head_layout import HeadLayout, HeadLayoutError, plan_heads
from qwen_logical.checkpoints.hf_names import CheckpointError, flax_from_hf, hf_from_flax, tensor_specs
from qwen_logical.sharding.mesh import MeshError, make_mesh, parse_mesh_shape, simulate_cpu_devices
from qwen_logical.model.model import Mode, ModelCallError, Qwen2ForCausalLM
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.report import ShardingReport, sharding_report
from qwen_logical.sharding.rules import TABLES, RuleError, RuleTable, get_table, parse_overrides
from qwen_logical.sharding.collectives import count_collectives
from qwen_logical.checkpoints.directory import Checkpoint, open_checkpoint
from qwen_logical.checkpoints.export import export_checkpoint
from qwen_logical.checkpoints.loader import load_checkpoint, load_params
from qwen_logical.checkpoints.tokenizer import Tokenizer, TokenizerError
from qwen_logical.inference import kv_cache
from qwen_logical.inference.generate import (GenerationError, GenerationResult, GenerationStream, Generator, StreamEvent,
                                   Timings, generate)
from qwen_logical.inference.sampling import SamplingError, SamplingParams
from qwen_logical.inference.speculative import DraftModel, Speculation, SpeculationError

__all__ = [
    "axes", "PRESETS", "ConfigError", "ModelConfig", "as_dtype", "from_hf_config", "preset", "to_hf_config",
    "HeadLayout", "HeadLayoutError", "plan_heads", "CheckpointError", "flax_from_hf", "hf_from_flax",
    "tensor_specs", "MeshError", "make_mesh", "parse_mesh_shape", "simulate_cpu_devices",
    "Mode", "ModelCallError", "Qwen2ForCausalLM", "Partitioner", "ShardingReport", "sharding_report", "TABLES", "RuleError",
    "RuleTable", "get_table", "parse_overrides", "count_collectives", "Checkpoint", "export_checkpoint",
    "load_checkpoint", "load_params", "open_checkpoint", "Tokenizer", "TokenizerError",
    "kv_cache", "GenerationError", "GenerationResult", "GenerationStream", "Generator", "StreamEvent",
    "Timings", "generate", "SamplingError", "SamplingParams", "DraftModel", "Speculation", "SpeculationError",
]
