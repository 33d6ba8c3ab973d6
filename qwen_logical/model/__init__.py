"""The model: logical axis names, ModelConfig, the head layout map, layers and the decoder."""
