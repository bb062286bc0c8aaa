"""``python -m services.synth [MODE] [--config FILE]``: the synth stage process (what the
container runs); everything but the kind comes from the stage registry."""

import sys

from services.runtime.app import main

if __name__ == "__main__":
    sys.exit(main("synth"))
