"""``python -m train.launch [NAME]``: where the installed launch recipes are (torchrun.sh, slurm.sbatch).

With a name, prints that recipe's path alone, for ``sbatch "$(python -m train.launch slurm.sbatch)" ...``;
without one, lists every recipe with its path. They are the checkout's launch/ folder, shipped in the package.
"""

from __future__ import annotations

import sys
from importlib.resources import as_file, files

PACKAGE = "t240dist.launch"


def main(args: list[str]) -> int:
    recipes = {p.name: p for p in files(PACKAGE).iterdir() if p.name.endswith((".sh", ".sbatch"))}
    if not args:
        for name, recipe in sorted(recipes.items()):
            with as_file(recipe) as path:
                print(f"{name}\t{path}")
        return 0
    if args[0] not in recipes:
        known = " | ".join(sorted(recipes))
        print(f"ConfigError: no launch recipe '{args[0]}' — pick {known}", file=sys.stderr)
        return 2
    with as_file(recipes[args[0]]) as path:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
