"""t240dist: Hydra-configured, Lightning-driven CNN training on CPU, one GPU or many."""

__version__ = "0.1.0"
