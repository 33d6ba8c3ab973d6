"""What every job shares: the one build path (build), device setup (devices), host memory (host_memory)."""
