"""The evaluations: each benchmark declared as data and scored (QA, IMHI, counseling, the reward model)."""
