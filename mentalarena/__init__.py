"""Shared machinery for the MentalArena scripts: chat backends, prompts, JSONL I/O, similarity, loaders."""
