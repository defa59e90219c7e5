"""From self-play records to trained models: SFT rows, preference pairs, data selection, answer perplexity, trainers, checkpoints."""
