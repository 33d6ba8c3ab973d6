"""HF checkpoints: safetensors I/O, the HF name map, loading into shards, export, the tokenizer."""
