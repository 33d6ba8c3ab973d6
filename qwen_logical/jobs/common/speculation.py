"""The run config's `speculative` block -> a `Speculation` (the draft model built and loaded on
the target's mesh, its tokenizer checked against the target's)."""

from __future__ import annotations

import os

from ml_collections import ConfigDict

from qwen_logical.inference.speculative import DRAFT, DraftModel, Speculation, SpeculationError
from qwen_logical.jobs.common import build


def same_vocabulary(draft_dir: str, target_tokenizer) -> None:
  """Raises SpeculationError unless the draft directory's tokenizer maps every token as the target's."""
  from qwen_logical.checkpoints.tokenizer import Tokenizer
  if not os.path.isfile(os.path.join(draft_dir, "tokenizer.json")):
    raise SpeculationError(f"the draft model {draft_dir} has no tokenizer.json: the draft method needs the draft's "
                           "tokenizer to check that it shares the target's vocabulary.")
  draft = Tokenizer.from_directory(draft_dir)
  ours, theirs = target_tokenizer.backend.get_vocab(True), draft.backend.get_vocab(True)
  if ours != theirs:
    differ = sorted(set(ours.items()) ^ set(theirs.items()))[:3]
    raise SpeculationError(
        f"the draft model's tokenizer ({draft.source}, {len(theirs)} tokens) is not the target's "
        f"({target_tokenizer.source}, {len(ours)} tokens); e.g. {differ}. A draft model must share the "
        "target's vocabulary (Qwen2.5 0.5B, 1.5B, 3B, 7B ... share one).")


def speculation_from(config: ConfigDict, target, tokenizer) -> Speculation | None:
  """The Speculation of --config.speculative.* for the target Partitioner (None when off)."""
  spec = config.get("speculative")
  if spec is None or not spec.method:
    return None
  if spec.method != DRAFT:
    if spec.draft_checkpoint:
      raise SpeculationError(f"speculative.draft_checkpoint is set but speculative.method={spec.method!r}; "
                             "use method=draft to draft with it.")
    return Speculation(spec.method, spec.num_tokens, spec.ngram)
  if not spec.draft_checkpoint:
    raise SpeculationError("speculative.method=draft needs --config.speculative.draft_checkpoint=DIR (an HF "
                           "directory of a model with the target's vocabulary, e.g. Qwen2.5-0.5B).")
  if tokenizer is not None:
    same_vocabulary(spec.draft_checkpoint, tokenizer)
  from qwen_logical.sharding.rules import get_table
  table = get_table(spec.draft_rules or config.rules, spec.draft_rule_overrides if spec.draft_rules else
                    config.rule_overrides)
  source = build.open_source(spec.draft_checkpoint, build.numerics(config, build.gathers_weights(table)),
                             "the draft model, loaded from its checkpoint")
  partitioner = build.make_partitioner(source, target.mesh, table)
  params, _ = source.weights(partitioner)
  return Speculation(DRAFT, spec.num_tokens, spec.ngram, draft=DraftModel(partitioner, params))
