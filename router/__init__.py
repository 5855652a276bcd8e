"""Chooses which expert (LoRA adapter, or none) serves a request."""
