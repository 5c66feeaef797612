"""Test and bench tooling (reference losses, sync detection, tiny models): never imported by a training run."""
