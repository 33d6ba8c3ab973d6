"""Serving: the engine (continuous batching over slots) and the OpenAI-compatible HTTP layer on top of it."""
