"""Every validation error is raised, before compiling, with a message naming the thing and the fix."""

import jax
import pytest

from conftest import mesh_of
from qwen_logical.model import axes as ax
from qwen_logical.model.config import ConfigError, ModelConfig, preset
from qwen_logical.model.hf_config import from_hf_config
from qwen_logical.model.head_layout import HeadLayoutError, plan_heads
from qwen_logical.sharding.mesh import MeshError, make_mesh, parse_mesh_shape, simulate_cpu_devices
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.rules import RuleError, RuleTable, TENSOR_PARALLEL, get_table, parse_overrides

TINY = preset("tiny").replace(scan_layers=True)  # messages name the scanned paths (layers/...)


def test_unknown_logical_name_in_override():
  with pytest.raises(RuleError, match=r"unknown logical axis name\(s\) \['hidden'\]"):
    get_table("tensor_parallel", "hidden=model")


def test_rule_naming_unknown_logical_name():
  table = RuleTable("bad", TENSOR_PARALLEL.rules + (("hidden", "model"),))
  with pytest.raises(RuleError, match=r"unknown logical name\(s\) \['hidden'\]"):
    Partitioner(TINY, mesh_of("1x8"), table)


def test_logical_name_without_rule():
  table = RuleTable("partial", tuple((n, v) for n, v in TENSOR_PARALLEL.rules if n != ax.MLP))
  with pytest.raises(RuleError, match=r"no rule for logical name\(s\) \['mlp'\]"):
    Partitioner(TINY, mesh_of("1x8"), table)


def test_mesh_axis_the_mesh_lacks():
  with pytest.raises(RuleError, match=r"mlp -> 'tensor' names a mesh axis the mesh lacks"):
    Partitioner(TINY, mesh_of("1x8"), get_table("tensor_parallel", "mlp=tensor"))


def test_mesh_axis_twice_in_one_spec():
  with pytest.raises(RuleError, match=r"parameter layers/attention/q_kernel .*mesh axis 'model' is used twice"):
    Partitioner(TINY, mesh_of("1x8"), get_table("tensor_parallel", "embed=model"))


def test_non_divisible_dimension_names_parameter_and_remedy():
  cfg = TINY.replace(intermediate_size=100)
  with pytest.raises(RuleError) as err:
    Partitioner(cfg, mesh_of("1x8"), get_table("tensor_parallel"))
  message = str(err.value)
  assert "layers/mlp/gate_kernel" in message and "size 100" in message and "8 devices" in message
  assert "--config.rules" in message and "--config.mesh" in message and "mlp=None" in message


def test_override_that_fixes_non_divisible_dimension():
  cfg = TINY.replace(intermediate_size=100)
  part = Partitioner(cfg, mesh_of("1x8"), get_table("tensor_parallel", {"mlp": None, "activation_mlp": None}))
  assert part.table.mesh_axes(ax.MLP) == ()


def test_batch_not_divisible_by_batch_axes():
  part = Partitioner(TINY, mesh_of("1x8"), get_table("data_parallel"))
  with pytest.raises(RuleError, match=r"token batch \(6, 4\).*multiple of 8"):
    part.check_batch(6, 4)


def test_head_axes_split_differently():
  with pytest.raises(RuleError, match="head-carrying axes must be split alike"):
    Partitioner(TINY, mesh_of("1x8"), get_table("tensor_parallel", "kv_heads=None"))


def test_heads_without_exact_layout():
  with pytest.raises(HeadLayoutError, match="3 KV heads cannot be split exactly over 8 shards"):
    plan_heads(12, 3, 8)
  cfg = TINY.replace(num_heads=6, num_kv_heads=3, head_dim=16, hidden_size=96)
  with pytest.raises(HeadLayoutError, match="--config.rules=fsdp"):
    Partitioner(cfg, mesh_of("1x8"), get_table("tensor_parallel"))


def test_device_count_mismatch_says_how_to_fix():
  with pytest.raises(MeshError, match=r"Mesh 2x2 needs 4 devices but JAX sees 8.*XLA_FLAGS=--xla_force_host_platform_device_count=4"):
    make_mesh("2x2")
  with pytest.raises(MeshError, match="already running with 8 CPU device"):
    simulate_cpu_devices(4)


def test_malformed_mesh_and_overrides():
  with pytest.raises(MeshError, match="BATCHxMODEL"):
    parse_mesh_shape("8")
  with pytest.raises(RuleError, match="logical_name=mesh_axis"):
    parse_overrides("mlp")
  with pytest.raises(RuleError, match="Unknown rule table 'zero3'"):
    get_table("zero3")
  assert parse_overrides("mlp=None, embed=batch+model") == {"mlp": None, "embed": ("batch", "model")}


def test_unsupported_model_configs():
  with pytest.raises(ConfigError, match="model_type='llama'"):
    from_hf_config({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
  base = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2}
  assert from_hf_config(base).head_dim == 8
  with pytest.raises(ConfigError, match="use_sliding_window"):
    from_hf_config({**base, "use_sliding_window": True})
  with pytest.raises(ConfigError, match="rope scaling type 'linear'"):
    from_hf_config({**base, "rope_scaling": {"type": "linear", "factor": 4.0}})
  assert dict(from_hf_config({**base, "rope_scaling": {"type": "yarn", "factor": 4.0}}).rope_scaling)["factor"] == 4.0
  # Keys left out mean what transformers' config classes assume (checked against them).
  from transformers import Qwen3Config, Qwen3MoeConfig
  qwen3 = {k: v for k, v in base.items() if k != "num_key_value_heads"} | {"model_type": "qwen3", "num_attention_heads": 32}
  assert (from_hf_config(qwen3).head_dim, from_hf_config(qwen3).num_kv_heads) == (128, 32) == (
      Qwen3Config(**qwen3).head_dim, Qwen3Config(**qwen3).num_key_value_heads)
  moe = qwen3 | {"model_type": "qwen3_moe", "num_attention_heads": 8, "num_experts": 4, "num_experts_per_tok": 2}
  assert from_hf_config(moe).num_kv_heads == Qwen3MoeConfig(**moe).num_key_value_heads == 4
  with pytest.raises(ConfigError, match="decoder_sparse_step"):
    from_hf_config({**base, "model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
                    "moe_intermediate_size": 16, "mlp_only_layers": [0]})
  with pytest.raises(ConfigError, match="num_experts_per_tok=9 must be in"):
    preset("tiny-qwen3-moe").replace(num_experts_per_tok=9)
  with pytest.raises(ConfigError, match="num_heads=4 is not a multiple of num_kv_heads=3"):
    from_hf_config({**base, "num_key_value_heads": 3})
  with pytest.raises(ConfigError, match="param_dtype='int8'"):
    TINY.replace(param_dtype="int8")
  with pytest.raises(ConfigError, match="Unknown model preset 'qwen3'"):
    preset("qwen3")


def test_place_rejects_misshaped_params():
  import numpy as np
  part = Partitioner(TINY, mesh_of("1x1"), get_table("tensor_parallel"))
  host = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), part.param_shapes)
  host["lm_head"] = np.zeros((3, 3), np.float32)
  with pytest.raises(ValueError, match=r"parameter lm_head has shape \(3, 3\), expected \(256, 112\)"):  # (vocab, embed)
    part.place(host)
