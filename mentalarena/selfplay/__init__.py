"""Self-play's parts below the session: patient and principle loaders, message lists, the judge
replies' parsers, sentence similarity."""
