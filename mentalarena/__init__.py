"""The MentalArena package, one folder per stage of the pipeline (docs/architecture.md): engines/,
selfplay/, training/, evaluation/, reports/, loop/, store/; the modules at this level are what every
script shares (errors, flags, prompts, the CLI helpers, the progress bar)."""
