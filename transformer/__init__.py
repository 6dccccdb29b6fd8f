"""transformer-nmt: train, understand and compare attention models for machine translation
(README.md has the module map)."""

__version__ = "0.1.0"
