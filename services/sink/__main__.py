"""``python -m services.sink [MODE] [--config FILE]``: the sink stage process (what the
container runs); everything but the kind comes from the stage registry."""

import sys

from services.runtime.app import main

if __name__ == "__main__":
    sys.exit(main("sink"))
