"""Neon on an xAR model: ``ray job submit -- python jobs/neon_xar.py [--config F] [--set k=v]``.

With no arguments it runs the embedded default (configs/default.yaml): local
Ray, a local run directory, the tiny digits xAR base pretrained on first use.
"""

import sys

from _common import main

if __name__ == "__main__":
    sys.exit(main("default.yaml", __doc__))
