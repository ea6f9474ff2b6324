"""Offline stage: audio trees -> index.json -> uint16 tar shards. Imports no torch."""
