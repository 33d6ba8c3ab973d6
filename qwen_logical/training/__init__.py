"""Fine-tuning with the same rule tables: data, loss, optimizer, the sharded train state and step."""
