"""Neon on a flow-matching model: ``ray job submit -- python jobs/neon_flow.py [--config F] [--set k=v]``.

With no arguments: the tiny flow model on the bundled digits (configs/flow-digits.yaml).
"""

import sys

from _common import main

if __name__ == "__main__":
    sys.exit(main("flow-digits.yaml", __doc__))
