"""``python -m services.density [MODE] [--config FILE]``: the density stage process (what the
container runs); everything but the kind comes from the stage registry."""

import sys

from services.runtime.app import main

if __name__ == "__main__":
    sys.exit(main("density"))
