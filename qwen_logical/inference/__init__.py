"""Generation: the KV cache, sampling, and the prefill/decode loop."""
