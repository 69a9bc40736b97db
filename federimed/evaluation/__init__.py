"""Scoring free-text treatment answers against what held-out patients actually received."""
