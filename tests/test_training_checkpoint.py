"""Train-state checkpoints: resume bit-identically on the same mesh, within 1e-5 on another mesh, table
and layer form; unfinished saves are never restored; another model's checkpoint is a clear error."""

import os

import jax
import numpy as np
import pytest
from orbax.checkpoint._src.path import atomicity

from conftest import mesh_of
from hf_reference import hf_tensors, model_config, real_looking_model
from qwen_logical.checkpoints.hf_names import flax_from_hf, hf_from_flax
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.rules import get_table
from qwen_logical.training import checkpointing
from qwen_logical.training.optimizer import OptimizerSettings, make_optimizer
from qwen_logical.training.state import init_state
from qwen_logical.training.step import make_train_step

STEPS, SAVED = 4, 2
SETTINGS = OptimizerSettings(learning_rate=3e-3, warmup_steps=1, steps=STEPS, weight_decay=0.01, clip_norm=1.0)


def batch(step):
  """The batch of optimizer step `step` (1-based): 8 rows, right padding, assistant-like masks."""
  rng = np.random.RandomState(step)
  tokens = rng.randint(0, 256, (8, 16)).astype(np.int32)
  attention = (np.arange(16)[None] < rng.randint(10, 17, (8, 1))).astype(np.int32)
  loss_mask = (attention * (np.arange(16)[None] >= 4)).astype(np.float32)
  return {"tokens": tokens * attention, "attention_mask": attention, "loss_mask": loss_mask}


class Run:
  """The real-looking model on one mesh / table / layer form, its step function and a fresh state."""

  def __init__(self, hf, mesh, table, scan_layers=False):
    self.config = model_config(hf, scan_layers=scan_layers)
    self.partitioner = Partitioner(self.config, mesh_of(mesh), get_table(table))
    self.optimizer = make_optimizer(SETTINGS)
    self.fns = make_train_step(self.partitioner, self.optimizer, clip_norm=SETTINGS.clip_norm)
    self.params = flax_from_hf(hf_tensors(hf), self.config, self.partitioner.layout)

  def fresh(self):
    return init_state(self.partitioner, self.optimizer, self.partitioner.place(self.params))

  def steps(self, state, first, last):
    losses = []
    for step in range(first, last + 1):
      state, metrics = self.fns.train_step(state, None, batch(step))
      losses.append(float(metrics["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def hf():
  return real_looking_model()


@pytest.fixture(scope="module")
def saved(hf, tmp_path_factory):
  """(run on 1x8 tensor_parallel, the uninterrupted losses, the checkpoint directory after SAVED steps,
  the canonical trainable params at SAVED)."""
  run = Run(hf, "1x8", "tensor_parallel")
  _, straight = run.steps(run.fresh(), 1, STEPS)
  directory = str(tmp_path_factory.mktemp("ckpt"))
  state = run.fresh()
  for step in range(1, SAVED + 1):
    state, _ = run.steps(state, step, step)
    written = checkpointing.save_state(directory, state, every=SAVED, partitioner=run.partitioner,
                                       data_position={"groups": step})
    assert written == (step % SAVED == 0)
  canonical = hf_from_flax(state.trainable, run.config, run.partitioner.layout)
  return run, straight, directory, canonical


def test_resume_on_the_same_mesh_is_bit_identical(saved):
  run, straight, directory, _ = saved
  assert checkpointing.latest_step(directory) == SAVED
  state, meta = checkpointing.restore_state(directory, run.fresh(), partitioner=run.partitioner)
  assert int(state.step) == SAVED and meta["data_position"] == {"groups": SAVED}
  _, resumed = run.steps(state, SAVED + 1, STEPS)
  assert resumed == straight[SAVED:]  # the same floats, not merely close


def test_resume_on_another_mesh_table_and_layer_form(hf, saved):
  _, straight, directory, canonical = saved
  run = Run(hf, "2x4", "fsdp", scan_layers=True)  # identity head layout (saved: padded / repeated), stacked layers
  state, _ = checkpointing.restore_state(directory, run.fresh(), partitioner=run.partitioner)
  restored = hf_from_flax(state.trainable, run.config, run.partitioner.layout)
  for name, value in canonical.items():  # moving heads and stacking layers is exact
    np.testing.assert_array_equal(restored[name], value, err_msg=name)
  for array, sharding in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(run.fns.shardings)):
    assert array.sharding == sharding  # resharded on load into this run's state shardings
  _, resumed = run.steps(state, SAVED + 1, STEPS)
  np.testing.assert_allclose(resumed, straight[SAVED:], rtol=1e-5)


def test_an_unfinished_save_is_never_restored(saved, tmp_path, monkeypatch):
  run, _, directory, _ = saved
  copy = str(tmp_path / "ckpt")
  os.system(f"cp -r {directory} {copy}")
  state, _ = checkpointing.restore_state(copy, run.fresh(), partitioner=run.partitioner)
  state, _ = run.steps(state, SAVED + 1, SAVED + 1)

  async def crash(self):  # the process dies after writing every file, before the rename
    raise RuntimeError("simulated crash before the rename")

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", crash)
  with pytest.raises(RuntimeError, match="simulated crash"):
    checkpointing.save_state(copy, state, force=True, partitioner=run.partitioner)
  monkeypatch.undo()
  assert any(".orbax-checkpoint-tmp" in name for name in os.listdir(copy))  # the partial save is there
  assert checkpointing.latest_step(copy) == SAVED
  restored, _ = checkpointing.restore_state(copy, run.fresh(), partitioner=run.partitioner)
  assert int(restored.step) == SAVED


def test_another_models_checkpoint_is_a_clear_error(saved):
  run, _, directory, _ = saved
  other = Partitioner(run.config.replace(intermediate_size=448), mesh_of("1x8"), get_table("tensor_parallel"))
  fresh = init_state(other, run.optimizer, other.init(0, progress=False))
  with pytest.raises(checkpointing.TrainCheckpointError, match=r"intermediate_size: checkpoint 224, this run 448"):
    checkpointing.restore_state(directory, fresh, partitioner=other)
  # Without the partitioner (no config to compare) the shapes still name both.
  with pytest.raises(checkpointing.TrainCheckpointError,
                     match=r"trainable/layers_0/mlp/down_kernel: checkpoint \(112, 224\) float32, "
                           r"this run \(112, 448\)"):
    checkpointing.restore_state(directory, fresh)
  # A LoRA run cannot continue a full fine-tuning checkpoint.
  with pytest.raises(checkpointing.TrainCheckpointError, match="LoRA: checkpoint None"):
    checkpointing.restore_state(directory, run.fresh(), partitioner=run.partitioner,
                                lora={"rank": 4, "alpha": 8.0, "targets": "q,v"})
