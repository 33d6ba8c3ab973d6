"""A tiny random model learns a small fixed conversation set, then generates the trained answers."""

from conftest import mesh_of
from qwen_logical.inference.generate import generate
from qwen_logical.model.config import preset
from qwen_logical.sharding.partitioner import Partitioner
from qwen_logical.sharding.rules import get_table
from qwen_logical.training import builtin_data
from qwen_logical.training.batching import Dataset
from qwen_logical.training.builtin_tokenizer import byte_tokenizer
from qwen_logical.training.data import tokenize_conversation
from qwen_logical.training.optimizer import OptimizerSettings, make_optimizer
from qwen_logical.training.state import init_state
from qwen_logical.training.step import make_train_step

STEPS = 150  # at 100 a change of float32 summation order left one answer's first token unlearned
LOSS_BOUND = 0.1  # nats per trained token; 5.8 at the start


def test_tiny_model_learns_conversations_and_generates_the_answers():
  tok = byte_tokenizer()
  conversations = builtin_data.CONVERSATIONS[:4]  # four capitals: similar questions, different answers
  examples = [tokenize_conversation(tok, c) for c in conversations]
  # 2x4 tensor parallel: the 14 query / 2 KV heads are padded and repeated, through training and generation.
  part = Partitioner(preset("tiny").replace(vocab_size=320), mesh_of("2x4"), get_table("tensor_parallel"))
  settings = OptimizerSettings(learning_rate=1e-2, warmup_steps=5, steps=STEPS, clip_norm=1.0)
  optimizer = make_optimizer(settings)
  fns = make_train_step(part, optimizer, clip_norm=settings.clip_norm)
  state = init_state(part, optimizer, part.init(0, progress=False))
  batch = Dataset(examples, (128,), tok.pad_id).collate(examples, 4)
  first = None
  for _ in range(STEPS):
    state, metrics = fns.train_step(state, None, batch)
    first = first or float(metrics["loss"])
  assert first > 4.0 and float(metrics["loss"]) < LOSS_BOUND
  assert float(fns.eval_step(state.trainable, None, batch)["loss"]) < LOSS_BOUND
  prompts = [tok.encode_chat(c[:-1]) for c in conversations]
  result = generate(part, state.trainable, prompts, tokenizer=tok, max_new_tokens=16)
  assert result.texts == [c[-1]["content"] for c in conversations]
  assert result.finish_reasons == ["stop"] * 4
