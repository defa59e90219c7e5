"""The self-training loop's data: the paper's runs and published numbers."""
