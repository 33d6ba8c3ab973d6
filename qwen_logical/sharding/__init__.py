"""Meshes, rule tables, their validation, the Partitioner, reports and process boundaries."""
