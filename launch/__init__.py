"""t240dist's launch recipes (torchrun, SLURM), installed as ``t240dist.launch``: ``python -m train.launch``
prints where they are."""
