"""Memorisation audit: canary records planted in one hospital's training data and their exposure in the model."""
