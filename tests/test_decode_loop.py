"""Decode loops on the device: K tokens per dispatch give, token for token, what one token per
dispatch gives (greedy, on a model whose logits look real), on every mesh and table, for a batch
whose rows stop at different steps; a sampled call draws the same tokens for every K.""" 

import functools

import numpy as np
import pytest

from conftest import mesh_of
from hf_reference import hf_tensors, model_config, varied_text_model
from qwen_logical.checkpoints.hf_names import flax_from_hf
from qwen_logical.inference.generate import Generator
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.rules import get_table

NEW = 19
PROMPTS = [np.random.RandomState(10 + r).randint(1, 256, n).tolist() for r, n in enumerate((5, 13, 8, 3))]
COMBINATIONS = [("1x1", "tensor_parallel"), ("1x8", "tensor_parallel"), ("2x4", "tp_fsdp"), ("4x2", "fsdp"),
                ("8x1", "data_parallel")]


@functools.lru_cache(maxsize=None)
def setup(mesh, table):
  hf = varied_text_model(seed=3)
  cfg = model_config(hf, scan_layers=table == "fsdp")
  part = Partitioner(cfg, mesh_of(mesh), get_table(table))
  return part, part.place(flax_from_hf(hf_tensors(hf), cfg, part.layout))


@functools.lru_cache(maxsize=None)
def one_token_per_dispatch():
  """1x1, K = 1: the reference tokens; stop ids that end rows at different steps."""
  part, params = setup("1x1", "tensor_parallel")
  plain = Generator(part, decode_steps=1).generate(params, PROMPTS, max_new_tokens=NEW).tokens
  stops = (plain[0][4], plain[2][9])  # row 0 stops at step 4, row 2 by step 9, the others run on
  stopped = Generator(part, decode_steps=1).generate(params, PROMPTS, max_new_tokens=NEW, stop_ids=stops)
  return plain, stops, stopped.tokens, stopped.finish_reasons


@pytest.mark.parametrize("mesh,table", COMBINATIONS)
def test_k_tokens_per_dispatch_equal_one_per_dispatch_on_every_mesh(mesh, table):
  """K = 5: dispatches end mid-row and past a row's stop; 18 decode steps are 4 dispatches."""
  plain, stops, stopped, reasons = one_token_per_dispatch()
  assert len({len(t) for t in stopped}) >= 3 and "stop" in reasons and "length" in reasons
  assert len({t for row in plain for t in row}) > 8  # not one repeated token
  part, params = setup(mesh, table)
  result = Generator(part, decode_steps=5).generate(params, PROMPTS, max_new_tokens=NEW, stop_ids=stops)
  assert result.tokens == stopped and result.finish_reasons == reasons, (mesh, table)
  assert result.timings.dispatches <= -(-(NEW - 1) // 5)


def test_sampled_tokens_do_not_depend_on_k():
  part, params = setup("1x1", "tensor_parallel")
  draws = [Generator(part, decode_steps=k).generate(params, PROMPTS, max_new_tokens=NEW, temperature=0.8,
                                                    top_p=0.9, seed=5) for k in (1, 8)]
  assert draws[0].tokens == draws[1].tokens
  assert draws[1].timings.dispatches == -(-(NEW - 1) // 8) and draws[0].timings.dispatches == NEW - 1
  greedy = Generator(part, decode_steps=8).generate(params, PROMPTS, max_new_tokens=NEW).tokens
  assert draws[0].tokens != greedy and greedy == one_token_per_dispatch()[0]
