"""Monitoring, evaluation and cost plumbing usable with any SB3 algorithm."""
