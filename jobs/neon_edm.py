"""Neon on an EDM diffusion model: ``ray job submit -- python jobs/neon_edm.py [--config F] [--set k=v]``.

With no arguments: the tiny EDM model on the bundled digits (configs/edm-digits.yaml).
"""

import sys

from _common import main

if __name__ == "__main__":
    sys.exit(main("edm-digits.yaml", __doc__))
