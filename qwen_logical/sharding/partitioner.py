"""The Partitioner: one (model config, mesh, rule table) and everything bound to it.

It computes the head layout for the mesh, builds the Flax module, validates the
rule table against every parameter and activation, resolves shardings through
`flax.linen.logical_to_mesh_sharding`, and builds jitted functions with the
rules and mesh bound inside them through the one program builder
(`sharding.programs.build`; the jit cache does not see an ambient rules context, so
each Partitioner owns its own programs).
"""

from __future__ import annotations

import contextlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from qwen_logical.model import axes as ax
from qwen_logical.model.config import ModelConfig
from qwen_logical.model.head_layout import HeadLayout, plan_heads
from qwen_logical.model.model import Qwen2ForCausalLM
from qwen_logical.sharding import distributed, programs, validation
from qwen_logical.sharding.init import init_params
from qwen_logical.sharding.mesh import mesh_name
from qwen_logical.sharding.rules import RuleTable
from qwen_logical.sharding.tree_paths import path_keys, path_str  # noqa: F401 (re-exported)

Params = Any  # nested dict of arrays, Flax layout


class Partitioner:
  """Owns a model on a mesh under a rule table.

  Attributes:
    layout: the HeadLayout for this mesh's split of the heads axis.
    model: the Qwen2ForCausalLM module (layout-shaped parameters).
    param_shapes: tree of jax.ShapeDtypeStruct (layout shapes).
    logical_specs: tree of PartitionSpec of logical names.
    param_shardings: tree of NamedSharding.
  """

  def __init__(self, config: ModelConfig, mesh: jax.sharding.Mesh, table: RuleTable):
    self.config, self.mesh, self.table = config, mesh, table
    self.mesh_shape = dict(mesh.shape)
    validation.check_table(table, self.mesh_shape)
    head_shards = validation.mesh_axes_size(self.mesh_shape, table.mesh_axes(ax.HEADS))
    self.layout: HeadLayout = plan_heads(config.num_heads, config.num_kv_heads, head_shards)
    self.model = Qwen2ForCausalLM(config, self.layout)
    self.batch_shards = validation.mesh_axes_size(self.mesh_shape, table.mesh_axes(ax.ACTIVATION_BATCH))

    boxed = jax.eval_shape(self._abstract_init)["params"]
    self.logical_specs = nn.get_partition_spec(boxed)
    self.param_shapes = nn.meta.unbox(boxed)
    self._check_params()
    self.param_shardings = nn.logical_to_mesh_sharding(self.logical_specs, mesh, table.rules)
    self._forward_jit = None

  @property
  def name(self) -> str:
    return f"{mesh_name(self.mesh)} {self.table.name}"

  @property
  def fingerprint(self) -> str:
    """Everything besides a program's own code and arguments that shapes what it compiles to."""
    devices = [(d.platform, d.id, d.process_index) for d in self.mesh.devices.flat]
    return "|".join(map(repr, (self.config, self.layout, self.table.rules, self.mesh.axis_names,
                               self.mesh.devices.shape, devices)))

  # --- validation -------------------------------------------------------------
  def _check_params(self) -> None:
    problems = []
    specs = jax.tree_util.tree_leaves_with_path(
        self.logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    shapes = jax.tree_util.tree_leaves(self.param_shapes)
    for (path, spec), shape in zip(specs, shapes):
      problems += validation.check_array(f"parameter {path_str(path)} {tuple(shape.shape)}",
                                         shape.shape, tuple(spec), self.table, self.mesh_shape)
    cfg, lay = self.config, self.layout
    activations = {
        "activation embed": ((0, 0, cfg.hidden_size), ax.EMBED_ACTIVATION),
        "activation query heads": ((0, 0, lay.layout_num_heads, cfg.head_dim), ax.QUERY_ACTIVATION),
        "activation kv heads": ((0, 0, lay.layout_num_kv_heads, cfg.head_dim), ax.KV_ACTIVATION),
        "activation mlp": ((0, 0, cfg.intermediate_size), ax.MLP_ACTIVATION),
        "activation logits": ((0, 0, cfg.vocab_size), ax.LOGITS_ACTIVATION),
    }  # the KV cache's shape belongs to inference.kv_cache, which checks it (check_cache)
    for label, (shape, names) in activations.items():
      problems += validation.check_array(label, shape, names, self.table, self.mesh_shape)
    validation.raise_if(problems, self.table, self.mesh_shape)

  def check_batch(self, batch_size: int, length: int, flag: str = "--config.batch_size") -> None:
    """Raises RuleError if a [batch_size, length] token batch does not split over the mesh; the
    message names `flag`, the setting that sets the batch size where the caller reads it."""
    problems = validation.check_array(f"token batch ({batch_size}, {length})", (batch_size, length),
                                      ax.TOKENS, self.table, self.mesh_shape)
    if problems:
      problems[-1] += f"; or use a batch size that is a multiple of {self.batch_shards} ({flag})"
    validation.raise_if(problems, self.table, self.mesh_shape)

  # --- shardings ----------------------------------------------------------------
  def sharding(self, logical_names) -> NamedSharding:
    spec = nn.logical_to_mesh_axes(tuple(logical_names), self.table.rules)
    return NamedSharding(self.mesh, spec)

  @contextlib.contextmanager
  def bound(self):
    """The rule table and (abstract) mesh, entered inside traced functions."""
    with nn.logical_axis_rules(self.table.rules), jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
      yield

  def program(self, fn, *, in_axes=None, out_axes=None, donate=(), name=None, keep=False) -> programs.Program:
    """`fn` compiled on this mesh under this table; see `qwen_logical.sharding.programs.build`.
    `programs.PARAMS` in the axes stands for the parameter tree's logical names."""
    swap = lambda axes: self.logical_specs if axes is programs.PARAMS else axes
    in_axes = None if in_axes is None else tuple(swap(a) for a in in_axes)
    if isinstance(out_axes, tuple) and not programs.is_names(out_axes):
      out_axes = tuple(swap(a) for a in out_axes)
    return programs.build(self, fn, in_axes=in_axes, out_axes=swap(out_axes), donate=donate, name=name,
                          keep=keep)

  # --- init -----------------------------------------------------------------------
  def _abstract_init(self):
    """The model's init, traced by eval_shape for shapes, dtypes and logical axes only (the model
    declares zeros; values come from `init` or a checkpoint)."""
    return self.model.init(jax.random.key(0), jnp.zeros((self.batch_shards, 1), jnp.int32))

  def init(self, seed: int = 0, progress: bool = True) -> Params:
    """Random parameters created directly in their shards (nothing full-size on one device).

    Values depend on (seed, parameter, layer, canonical position) only, so every mesh, rule
    table and layer form holds the same model; see `qwen_logical.sharding.init`.
    """
    return init_params(self, seed, progress=progress)

  def place(self, host_params: Params) -> Params:
    """Puts layout-shaped host (numpy) params onto the mesh, checking every shape first."""
    expected = jax.tree_util.tree_leaves_with_path(self.param_shapes)
    flat = dict((path_str(p), v) for p, v in jax.tree_util.tree_leaves_with_path(host_params))
    for path, shape in expected:
      key = path_str(path)
      if key not in flat:
        raise ValueError(f"parameter {key} is missing; expected shape {tuple(shape.shape)}")
      if tuple(np.shape(flat[key])) != tuple(shape.shape):
        raise ValueError(f"parameter {key} has shape {tuple(np.shape(flat[key]))}, expected "
                         f"{tuple(shape.shape)} (layout of {self.layout.describe()})")
    extra = set(flat) - {path_str(p) for p, _ in expected}
    if extra:
      raise ValueError(f"unexpected parameter(s) {sorted(extra)} for this model config")
    cast = jax.tree_util.tree_map(lambda x, s: np.asarray(x, dtype=s.dtype), host_params, self.param_shapes)
    return jax.device_put(cast, self.param_shardings)

  # --- forward --------------------------------------------------------------------
  def forward_fn(self):
    """program(params, tokens, attention_mask) -> logits, shardings pinned to this mesh and table."""
    if self._forward_jit is None:
      def forward(params, tokens, attention_mask):
        return self.model.apply({"params": params}, tokens, attention_mask)

      self._forward_jit = self.program(forward, in_axes=(programs.PARAMS, ax.TOKENS, ax.TOKENS),
                                       out_axes=ax.LOGITS_ACTIVATION, name="forward")
    return self._forward_jit

  def forward(self, params: Params, tokens, attention_mask=None) -> jax.Array:
    """tokens int[B, L] (+ mask) -> logits [B, L, V], sharded (activation_batch, -, activation_vocab)."""
    tokens = np.asarray(tokens, np.int32)
    mask = np.ones_like(tokens) if attention_mask is None else np.asarray(attention_mask, np.int32)
    self.check_batch(*tokens.shape)
    sharding = self.sharding(ax.TOKENS)
    return self.forward_fn()(params, distributed.global_array(tokens, sharding),
                             distributed.global_array(mask, sharding))

  def lower_forward(self, batch_size: int, length: int):
    """The lowered forward for a [batch_size, length] batch (for compile timing and HLO)."""
    self.check_batch(batch_size, length)
    tokens = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
    return self.forward_fn().lower(self.param_shapes, tokens, tokens)
