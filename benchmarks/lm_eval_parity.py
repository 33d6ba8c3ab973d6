"""lm-evaluation-harness through our server scores as lm-eval's own `hf` model on the same weights.

    .venv/bin/python benchmarks/lm_eval_parity.py                    # both tiny checkpoints, ~30 s on 2 cores
    .venv/bin/python benchmarks/lm_eval_parity.py --neutral-generation-config --num-concurrent 4

Needs lm-eval with its api and hf extras (`.venv/bin/pip install "lm-eval[api,hf]"`, 0.4.x). Nothing is
downloaded: the checkpoint, its tokenizer and the tasks are made on the spot in a temporary directory.

Per checkpoint (tests/serve_helpers.write_instruct_checkpoint: a tiny transformers Qwen2 saved with
save_pretrained plus a Qwen-style tokenizer directory; `real_looking` has logits like a real model's and
greedy text that repeats, `tiny` draws every weight at one scale and its greedy text varies):
  1. three local lm-eval tasks are written (YAML + JSONL, `dataset_path: json`): `parity_mc`, 20
     multiple-choice questions (loglikelihood requests; acc, acc_norm); `parity_gen`, 10 questions answered
     greedily (generate_until with stop strings; exact_match against fixed answers); `parity_gen_rp`, the same
     with repetition_penalty 1.05 in its generation_kwargs (lm-eval forwards it to the server as a field);
  2. the server is started as a user starts it (`main.py --config=configs/serve.py --config.checkpoint=DIR`, a
     free port on 127.0.0.1) and lm-eval's `local-completions` model runs the tasks against /v1/completions,
     tokenizing with the checkpoint's own tokenizer (tokenizer_backend=huggingface, token-id prompts); every
     payload it builds is recorded (kinds of request, fields, prompts per request);
  3. the server is stopped and lm-eval's `hf` model (transformers, float32, CPU) runs the same tasks;
  4. every metric must be equal (acc, acc_norm, exact_match, exactly), every per-choice loglikelihood within
     --tolerance, every generated string identical (lm-eval's logged samples).

The checkpoints' generation_config.json is Qwen2.5-Instruct's, repetition_penalty 1.05 included: transformers'
generate applies it even to greedy decoding (so lm-eval's hf model does), which a server that ignores the
file's defaults does not; `parity_gen` then differs and a note says why. --neutral-generation-config drops
those defaults from the file (plain greedy on both sides).

If the server refuses a request (e.g. --batch-size above 1 puts several prompts in one request), the recorded
payload is sent again and its status and error body are reported. Prints a table, writes
benchmarks/results/lm_eval_parity.json, exits 1 if anything differs or fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from results_file import write_results
from serve import free_port, wait_healthy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results", "lm_eval_parity.json")
MODEL_NAME = "parity-tiny"
CONTEXT = 256  # the tiny checkpoints' max_position_embeddings (write_instruct_checkpoint)
TASKS = ("parity_mc", "parity_gen", "parity_gen_rp")
# Qwen2.5-Instruct's generation_config.json (as write_instruct_checkpoint writes it) carries sampling defaults;
# transformers' generate applies its repetition_penalty even to greedy decoding, so lm-eval's hf model does.
SAMPLING_DEFAULTS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty")
REPETITION_PENALTY = 1.05  # parity_gen_rp asks for it in its generation_kwargs (sent to the server as a field)

# (question, choices, index of the right one): some choices are one token, some several, of unequal lengths
# (so acc_norm, which divides by the choice's length in bytes, can pick otherwise than acc).
MULTIPLE_CHOICE = [
    ("What colour is a clear sky at noon?", ["blue", "green", "red", "black"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten", "four"], 1),
    ("Which animal says 'moo'?", ["a dog", "a cat", "a cow", "a duck"], 2),
    ("What is 2 + 2?", ["3", "4", "5", "22"], 1),
    ("Which is a fruit?", ["carrot", "potato", "apple", "onion"], 2),
    ("What do bees make?", ["milk", "honey", "silk", "wool"], 1),
    ("Which planet do we live on?", ["Mars", "Venus", "Earth", "Jupiter"], 2),
    ("What is frozen water called?", ["steam", "ice", "sand", "glass"], 1),
    ("Which number is even?", ["7", "9", "12", "15"], 2),
    ("Where does the sun rise?", ["in the east", "in the west", "in the north", "in the south"], 0),
    ("What does a thermometer measure?", ["weight", "length", "temperature", "speed"], 2),
    ("Which of these can fly?", ["a fish", "a bird", "a worm", "a snail"], 1),
    ("How many days are in a week?", ["five", "six", "seven", "eight"], 2),
    ("What is the opposite of hot?", ["warm", "cold", "wet", "loud"], 1),
    ("Which shape has three sides?", ["square", "circle", "triangle", "hexagon"], 2),
    ("What do plants need from the sun?", ["light", "sound", "salt", "sugar water from the sky"], 0),
    ("Which tool cuts paper?", ["a spoon", "scissors", "a hammer", "a brush"], 1),
    ("def f(x): return x * 2\nWhat is f(3)?", ["5", "6", "9", "32"], 1),
    ("Which word is a verb?", ["quickly", "blue", "run", "happy"], 2),
    ("What is 10 - 4?", ["6", "4", "14", "40"], 0),
]

# (question, answer): the random models' answers are wrong; both models must give the same wrong ones.
GENERATE = [
    ("What is the capital of France?", "Paris"),
    ("Name a primary colour.", "red"),
    ("What is 3 times 3?", "9"),
    ("Complete: the quick brown fox jumps over the lazy", "dog"),
    ("Which day comes after Monday?", "Tuesday"),
    ("Say hello in French.", "bonjour"),
    ("What is the first letter of the alphabet?", "A"),
    ("Finish the code: print(greet(", "name))"),
    ("How many wheels does a bicycle have?", "two"),
    ("What sound does a cat make?", "meow"),
]


def write_tasks(directory: str, max_gen_toks: int) -> None:
  """The two tasks' YAML configs and JSONL data files in `directory` (lm-eval's include_path)."""
  import yaml
  os.makedirs(directory, exist_ok=True)
  mc_path, gen_path = os.path.join(directory, "mc.jsonl"), os.path.join(directory, "gen.jsonl")
  with open(mc_path, "w") as f:
    for question, choices, label in MULTIPLE_CHOICE:
      f.write(json.dumps({"question": question, "choices": choices, "label": label}) + "\n")
  with open(gen_path, "w") as f:
    for question, answer in GENERATE:
      f.write(json.dumps({"question": question, "answer": answer}) + "\n")
  mean = {"aggregation": "mean", "higher_is_better": True}
  mc = {"task": "parity_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": mc_path}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_choice": "choices", "doc_to_target": "label",
        "metric_list": [{"metric": "acc", **mean}, {"metric": "acc_norm", **mean}], "metadata": {"version": 1.0}}
  greedy = {"until": ["\n", "Q:"], "do_sample": False, "temperature": 0.0, "max_gen_toks": max_gen_toks}
  gen = {"task": "parity_gen", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": gen_path}},
         "test_split": "test", "output_type": "generate_until", "doc_to_text": "Q: {{question}}\nA:",
         "doc_to_target": "answer", "generation_kwargs": greedy,
         "metric_list": [{"metric": "exact_match", **mean, "ignore_case": True, "ignore_punctuation": True}],
         "metadata": {"version": 1.0}}
  penalised = {**gen, "task": "parity_gen_rp",
               "generation_kwargs": {**greedy, "repetition_penalty": REPETITION_PENALTY}}
  for config in (mc, gen, penalised):
    with open(os.path.join(directory, config["task"] + ".yaml"), "w") as f:
      yaml.safe_dump(config, f, sort_keys=False)


# ----------------------------------------------------------------------------- what lm-eval sends


class PayloadLog:
  """Records every payload lm-eval's local-completions builds: per kind (loglikelihood / generate_until) the
  count, the fields, prompts per request, max_tokens values, the first payload of each set of fields, and the
  last payload."""

  def __init__(self):
    self.kinds: dict[str, dict] = {}
    self._original = None

  def __enter__(self) -> "PayloadLog":
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    self._original = original = LocalCompletionsAPI._create_payload
    log = self

    def recording(api, messages, generate=False, gen_kwargs=None, seed=1234, eos=None, **kwargs):
      payload = original(api, messages, generate=generate, gen_kwargs=gen_kwargs, seed=seed, eos=eos, **kwargs)
      log.add("generate_until" if generate else "loglikelihood", payload)
      return payload

    LocalCompletionsAPI._create_payload = recording
    return self

  def __exit__(self, *exc) -> None:
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    LocalCompletionsAPI._create_payload = self._original

  def add(self, kind: str, payload: dict) -> None:
    entry = self.kinds.setdefault(kind, {"requests": 0, "fields": set(), "prompts_per_request": set(),
                                         "prompt_types": set(), "max_tokens": set(), "examples": {}})
    prompt = payload.get("prompt")
    entry["requests"] += 1
    entry["fields"].update(payload)
    entry["prompts_per_request"].add(len(prompt) if isinstance(prompt, list) and prompt
                                     and isinstance(prompt[0], (list, str)) else 1)
    entry["prompt_types"].add(_prompt_type(prompt))
    entry["max_tokens"].add(payload.get("max_tokens"))
    entry["examples"].setdefault(tuple(sorted(payload)), copy.deepcopy(payload))  # one per set of fields
    entry["last"] = copy.deepcopy(payload)

  def summary(self) -> dict:
    out = {}
    for kind, entry in self.kinds.items():
      out[kind] = {"requests": entry["requests"], "fields": sorted(entry["fields"]),
                   "prompts_per_request": sorted(entry["prompts_per_request"]),
                   "prompt_types": sorted(entry["prompt_types"]), "max_tokens": sorted(entry["max_tokens"]),
                   "examples": [_shortened(p) for p in entry["examples"].values()]}
    return out


def _prompt_type(prompt) -> str:
  if isinstance(prompt, str):
    return "str"
  if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
    return "list[list[int]]"
  if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
    return "list[str]"
  return "list[int]" if isinstance(prompt, list) else type(prompt).__name__


def _shortened(payload: dict) -> dict:
  """The payload with each token-id prompt cut to its first 8 ids (and its length said)."""
  out = dict(payload)
  prompt = out.get("prompt")
  if isinstance(prompt, list) and prompt and isinstance(prompt[0], list):
    out["prompt"] = [p[:8] + [f"... {len(p)} ids"] if len(p) > 8 else p for p in prompt]
  return out


def replay(url: str, payload: dict) -> dict:
  """Sends `payload` again: {'status', 'body'} of the server's answer (its error, when it refused)."""
  request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=300) as response:
      return {"status": response.status, "body": json.loads(response.read())}
  except urllib.error.HTTPError as e:
    body = e.read().decode(errors="replace")
    try:
      body = json.loads(body)
    except ValueError:
      pass
    return {"status": e.code, "body": body}
  except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
    return {"status": None, "body": repr(e)}


# ----------------------------------------------------------------------------- the two runs


def evaluate(model: str, model_args: dict, task_dir: str, batch_size: int) -> dict:
  """lm_eval.simple_evaluate of the tasks, samples logged: {'results': ..., 'samples': ...}."""
  import lm_eval
  from lm_eval.tasks import TaskManager
  out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS), batch_size=batch_size,
                                device="cpu", log_samples=True, bootstrap_iters=0, random_seed=0,
                                task_manager=TaskManager(include_path=task_dir, include_defaults=False))
  return {"results": out["results"], "samples": out["samples"]}


def start_server(checkpoint: str, port: int, args, log) -> subprocess.Popen:
  command = [sys.executable, "main.py", "--config=configs/serve.py", f"--config.checkpoint={checkpoint}",
             f"--config.serve.port={port}", f"--config.serve.model_name={MODEL_NAME}",
             f"--config.serve.context={CONTEXT}", f"--config.serve.slots={args.slots}", f"--config.mesh={args.mesh}"]
  return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def stop_server(server: subprocess.Popen) -> None:
  if server.poll() is None:
    server.terminate()
    try:
      server.wait(timeout=60)
    except subprocess.TimeoutExpired:
      server.kill()
      server.wait()


def run_server_side(checkpoint: str, task_dir: str, args, log_path: str) -> dict:
  """local-completions against a freshly started server: its results, the payloads, timings, any refusal."""
  port = free_port()
  base = f"http://127.0.0.1:{port}"
  launched = time.perf_counter()
  log = open(log_path, "w")
  server = start_server(checkpoint, port, args, log)
  out: dict = {"server_log": log_path}
  try:
    out["startup_s"] = wait_healthy(base, server, limit_s=args.startup_limit) - launched
    model_args = {"model": MODEL_NAME, "base_url": f"{base}/v1/completions", "tokenizer_backend": "huggingface",
                  "tokenizer": checkpoint, "tokenized_requests": True, "num_concurrent": args.num_concurrent,
                  "max_retries": 1, "max_length": CONTEXT, "timeout": 600}
    out["model_args"] = model_args
    with PayloadLog() as payloads:
      start = time.perf_counter()
      try:
        out.update(evaluate("local-completions", model_args, task_dir, args.batch_size))
      except Exception as error:  # noqa: BLE001 - reported with the server's answer to the same payload
        out["error"] = f"{type(error).__name__}: {error}"
        out["refusals"] = {kind: {"payload": _shortened(entry["last"]),
                                  "answer": replay(f"{base}/v1/completions", entry["last"])}
                           for kind, entry in payloads.kinds.items()}
      out["eval_s"] = time.perf_counter() - start
    out["payloads"] = payloads.summary()
  finally:
    stop_server(server)
    log.close()
  return out


def run_hf_side(checkpoint: str, task_dir: str) -> dict:
  start = time.perf_counter()
  out = evaluate("hf", {"pretrained": checkpoint, "dtype": "float32"}, task_dir, batch_size=1)
  out["eval_s"] = time.perf_counter() - start
  return out


# ----------------------------------------------------------------------------- comparing


def compare(server: dict, hf: dict, tolerance: float) -> dict:
  """Metric by metric and sample by sample: {'metrics': rows, 'samples': per task, 'equal': bool}."""
  rows, equal = [], True
  for task in TASKS:
    ours, theirs = server["results"].get(task, {}), hf["results"].get(task, {})
    for key in sorted(set(ours) | set(theirs)):
      a, b = _plain(ours.get(key)), _plain(theirs.get(key))
      if not isinstance(a, (int, float)) and not isinstance(b, (int, float)):
        continue  # "N/A" stderrs (no bootstrap), names
      same = a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
      equal &= same
      rows.append({"task": task, "metric": key, "local_completions": a, "hf": b, "equal": same})
  samples = {"parity_mc": _compare_choices(server, hf, tolerance)}
  for task in TASKS[1:]:
    samples[task] = _compare_generations(server, hf, task)
  equal &= all(s["equal"] for s in samples.values())
  return {"metrics": rows, "samples": samples, "equal": equal}


def _plain(value):
  """`value` with numpy scalars (lm-eval's metrics and flags) made Python numbers, for JSON and comparing."""
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if hasattr(value, "item") and callable(value.item):
    return value.item()
  return value


def _by_doc(run: dict, task: str) -> dict:
  return {s["doc_id"]: s for s in run["samples"].get(task, [])}


def _compare_choices(server: dict, hf: dict, tolerance: float) -> dict:
  ours, theirs = _by_doc(server, "parity_mc"), _by_doc(hf, "parity_mc")
  worst, greedy_differs, picks_differ, count, worst_at = 0.0, 0, 0, 0, None
  for doc_id in sorted(set(ours) | set(theirs)):
    a, b = ours[doc_id]["filtered_resps"], theirs[doc_id]["filtered_resps"]
    for choice, ((ll_a, greedy_a), (ll_b, greedy_b)) in enumerate(zip(a, b)):
      count += 1
      if abs(ll_a - ll_b) >= worst:
        worst, worst_at = abs(ll_a - ll_b), {"doc_id": doc_id, "choice": choice, "local_completions": ll_a, "hf": ll_b}
      greedy_differs += bool(greedy_a != greedy_b)
    picks_differ += max(range(len(a)), key=lambda i: a[i][0]) != max(range(len(b)), key=lambda i: b[i][0])
  same_docs = set(ours) == set(theirs) and len(ours) == len(MULTIPLE_CHOICE)
  return {"docs": len(ours), "choices": count, "max_abs_loglikelihood_diff": worst, "worst": worst_at,
          "tolerance": tolerance, "is_greedy_differs": greedy_differs, "argmax_differs": picks_differ,
          "equal": same_docs and worst < tolerance and picks_differ == 0}


def _compare_generations(server: dict, hf: dict, task: str) -> dict:
  ours, theirs = _by_doc(server, task), _by_doc(hf, task)
  differing = []
  for doc_id in sorted(set(ours) | set(theirs)):
    a = ours.get(doc_id, {}).get("filtered_resps", [None])[0]
    b = theirs.get(doc_id, {}).get("filtered_resps", [None])[0]
    if a != b:
      differing.append({"doc_id": doc_id, "local_completions": a, "hf": b})
  texts = [(d, ours[d]["filtered_resps"][0]) for d in sorted(ours)]
  return {"docs": len(ours), "identical": len(ours) - len(differing), "differing": differing,
          "generations": dict(texts), "equal": not differing and len(ours) == len(GENERATE)}


# ----------------------------------------------------------------------------- the report


def print_report(name: str, comparison: dict) -> None:
  print(f"\n== checkpoint {name}")
  print(f"{'task':<13} {'metric':<18} {'local-completions':>18} {'hf':>10}  equal")
  for row in comparison["metrics"]:
    a, b = row["local_completions"], row["hf"]
    print(f"{row['task']:<13} {row['metric']:<18} {_number(a):>18} {_number(b):>10}  {'yes' if row['equal'] else 'NO'}")
  mc = comparison["samples"]["parity_mc"]
  print(f"parity_mc: {mc['choices']} choices over {mc['docs']} questions, max |loglikelihood diff| "
        f"{mc['max_abs_loglikelihood_diff']:.2e} (tolerance {mc['tolerance']:.0e}), picks differing "
        f"{mc['argmax_differs']}, is_greedy differing {mc['is_greedy_differs']}")
  for task in TASKS[1:]:
    gen = comparison["samples"][task]
    print(f"{task}: {gen['identical']}/{gen['docs']} generations identical")
    for doc_id, text in gen["generations"].items():
      print(f"  doc {doc_id}: {text!r}")
    for d in gen["differing"]:
      print(f"  differs, doc {d['doc_id']}: local-completions {d['local_completions']!r} / hf {d['hf']!r}")
  if comparison.get("note"):
    print(f"note: {comparison['note']}")
  print(f"checkpoint {name}: {'EQUAL' if comparison['equal'] else 'DIFFERENT'}")


def _number(x) -> str:
  return f"{x:.4f}" if isinstance(x, float) else str(x)


def print_payloads(payloads: dict) -> None:
  for kind, p in payloads.items():
    print(f"lm-eval {kind}: {p['requests']} requests, prompts per request {p['prompts_per_request']}, "
          f"prompt {p['prompt_types']}, fields {p['fields']}")
    for example in p["examples"]:
      print(f"  e.g. {json.dumps(example)}")


def one_checkpoint(name: str, args, root: str) -> dict:
  sys.path.insert(0, os.path.join(REPO, "tests"))
  from serve_helpers import write_instruct_checkpoint
  directory = os.path.join(root, name)
  checkpoint, task_dir = os.path.join(directory, "checkpoint"), os.path.join(directory, "tasks")
  write_instruct_checkpoint(checkpoint, real_looking=name == "real_looking", seed=args.seed)
  defaults = generation_defaults(checkpoint, drop=args.neutral_generation_config)
  write_tasks(task_dir, args.max_gen_toks)
  print(f"\n-- {name}: local-completions against the server (log: {directory}/server.log)", flush=True)
  server = run_server_side(checkpoint, task_dir, args, os.path.join(directory, "server.log"))
  print_payloads(server["payloads"])
  record = {"server_startup_s": server.get("startup_s"), "local_completions_eval_s": server.get("eval_s"),
            "payloads": server["payloads"], "model_args": server.get("model_args")}
  if "error" in server:
    print(f"local-completions failed: {server['error']}")
    for kind, refusal in server["refusals"].items():
      print(f"  last {kind} payload {json.dumps(refusal['payload'])}\n  -> {json.dumps(refusal['answer'])[:2000]}")
    with open(server["server_log"]) as f:
      tail = f.read()[-3000:]
    print(f"server log tail:\n{tail}")
    return {**record, "error": server["error"], "refusals": server["refusals"], "equal": False}
  print(f"\n-- {name}: lm-eval's hf model", flush=True)
  hf = run_hf_side(checkpoint, task_dir)
  comparison = compare(server, hf, args.tolerance)
  penalty = defaults.get("repetition_penalty", 1.0)
  if not comparison["samples"]["parity_gen"]["equal"] and penalty != 1.0 and not args.neutral_generation_config:
    comparison["note"] = (f"the checkpoint's generation_config.json sets repetition_penalty={penalty}: transformers' "
                          "generate (lm-eval's hf) applies it to greedy decoding, the server does not apply "
                          "generation_config defaults (parity_gen_rp sends the penalty explicitly; "
                          "--neutral-generation-config drops the defaults)")
  print_report(name, comparison)
  return {**record, "generation_config_defaults": defaults, "hf_eval_s": hf["eval_s"], **comparison}


def generation_defaults(checkpoint: str, drop: bool) -> dict:
  """The sampling defaults of the checkpoint's generation_config.json; with `drop`, removed from the file
  (eos, bos and pad ids kept), so transformers' greedy generate is plain greedy."""
  path = os.path.join(checkpoint, "generation_config.json")
  with open(path) as f:
    config = json.load(f)
  defaults = {k: config[k] for k in SAMPLING_DEFAULTS if k in config}
  if drop:
    with open(path, "w") as f:
      json.dump({k: v for k, v in config.items() if k not in SAMPLING_DEFAULTS}, f, indent=2)
  return defaults


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoints", nargs="+", default=["real_looking", "tiny"], choices=["real_looking", "tiny"])
  parser.add_argument("--batch-size", type=int, default=1, help="prompts per local-completions request")
  parser.add_argument("--num-concurrent", type=int, default=1, help="local-completions requests in flight")
  parser.add_argument("--max-gen-toks", type=int, default=32)
  parser.add_argument("--tolerance", type=float, default=1e-3, help="per-choice loglikelihood, absolute")
  parser.add_argument("--mesh", default="1x1")
  parser.add_argument("--slots", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--startup-limit", type=float, default=900.0, help="seconds for the server to answer /health")
  parser.add_argument("--neutral-generation-config", action="store_true",
                      help="drop the sampling defaults (repetition_penalty 1.05, ...) from generation_config.json")
  parser.add_argument("--keep", action="store_true", help="keep the temporary directory (checkpoints, tasks, logs)")
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args()
  for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[variable] = "1"  # everything is local; lm-eval and datasets must not try the hub

  import lm_eval
  import torch
  import transformers
  started = time.perf_counter()
  root = tempfile.mkdtemp(prefix="lm_eval_parity_")
  runs = {}
  try:
    for name in args.checkpoints:
      runs[name] = one_checkpoint(name, args, root)
  finally:
    if not args.keep:
      import shutil
      shutil.rmtree(root, ignore_errors=True)
  total = time.perf_counter() - started
  equal = all(run["equal"] for run in runs.values())
  print(f"\n{'ALL EQUAL' if equal else 'DIFFERENCES FOUND'} ({total:.0f} s in all)")
  write_results(args.out, _plain({
      "equal": equal, "wall_s": total, "versions": {"lm_eval": lm_eval.__version__, "torch": torch.__version__,
                                                     "transformers": transformers.__version__},
      "settings": {k: v for k, v in vars(args).items() if k not in ("out", "keep")}, "context": CONTEXT,
      "tasks": {"parity_mc": len(MULTIPLE_CHOICE), "parity_gen": len(GENERATE), "parity_gen_rp": len(GENERATE)},
      "checkpoints": runs}))
  sys.exit(0 if equal else 1)


if __name__ == "__main__":
  main()
