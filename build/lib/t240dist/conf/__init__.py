"""t240dist's Hydra config tree, installed as the package ``t240dist.conf`` (``pkg://t240dist.conf``)."""
