"""``python -m tunesmith ...`` is the ``tunesmith`` command; launchers start it this way:
``torchrun --nproc-per-node 2 -m tunesmith train ...``, ``accelerate launch -m tunesmith train ...``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
