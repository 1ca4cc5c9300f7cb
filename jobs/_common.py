"""What every job script shares: flags, config resolution, the final table.

Kept out of ``neon_ray`` on purpose: this is the thin job shell
(parse → validate → ``pipeline.run``), identical for every family.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # run from a checkout without installing


def main(default_config: str, description: str) -> int:
    from neon_ray import config as C
    from neon_ray import pipeline

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=os.path.join(HERE, "configs", default_config),
                        help=f"experiment YAML (default: configs/{default_config}, the embedded default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    args = parser.parse_args()
    try:
        cfg = C.load(pipeline.PipelineConfig, args.config, args.set)
    except C.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(C.dump(cfg), end="")
        return 0
    pipeline.run_cli(cfg)
    return 0
