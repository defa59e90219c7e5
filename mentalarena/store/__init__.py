"""Writing and reading work on disk: crash-safe JSONL, atomic writes, locks, the one input reader."""
