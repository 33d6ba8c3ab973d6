"""Where a benchmark's JSON goes, and writing it (shared by the scripts in benchmarks/)."""

import json
import os


def write_results(path: str, result: dict) -> None:
  """Writes `result` as indented JSON to `path` (its folder made if needed) and says where."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {path}")
