"""The ``neon-ray`` console command.

Every subcommand is a config dataclass plus a ``run(cfg)`` function, listed in
:data:`COMMANDS`. Flags are generated from the dataclass: each top-level
scalar field ``foo_bar`` is ``--foo-bar``; nested fields are set with
``--set section.field=value`` or through the aliases a command declares (for
example ``--cfg`` for ``sampler.guidance``). Every command takes
``--config FILE`` (YAML), ``--set`` and ``--dry-run`` (print the resolved
config and exit). Errors in the config print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import typing
from dataclasses import dataclass, field
from typing import Any

from neon_ray import config as C

SAMPLER_ALIASES = {"cfg": "sampler.guidance", "steps": "sampler.steps", "solver": "sampler.solver",
                   "churn": "sampler.churn", "temperature": "sampler.temperature"}


@dataclass
class Command:
    config: str                       # "module:ConfigClass"
    run: str                          # "module:function" taking the config
    help: str
    aliases: dict[str, str] = field(default_factory=dict)  # --flag -> dotted field


COMMANDS: dict[str, Command] = {
    "pretrain": Command("neon_ray.pretrain:PretrainConfig", "neon_ray.pretrain:run",
                        "train a base model with EMA and write a checkpoint"),
    "sample": Command("neon_ray.sample:SampleConfig", "neon_ray.sample:run",
                      "stage 1: sample the synthetic set S into Parquet shards", SAMPLER_ALIASES),
    "finetune": Command("neon_ray.finetune:FinetuneConfig", "neon_ray.finetune:run",
                        "stage 2: fine-tune the base on S with Ray Train + DeepSpeed, with snapshots"),
    "sweep": Command("neon_ray.sweep:SweepConfig", "neon_ray.sweep:run",
                     "stage 4: search (snapshot, w, γ) by FID with Ray Tune, write the winner"),
    "run": Command("neon_ray.pipeline:PipelineConfig", "neon_ray.pipeline:run_cli",
                   "the whole method (sample, fine-tune, sweep, final merge, report) in one run directory"),
    "evaluate": Command("neon_ray.evaluate.run:EvaluateConfig", "neon_ray.evaluate.run:run",
                        "sample a checkpoint and measure FID / precision / recall",
                        SAMPLER_ALIASES),
    "ref-stats": Command("neon_ray.evaluate.run:RefStatsConfig", "neon_ray.evaluate.run:run_ref_stats",
                         "compute reference feature statistics of a real dataset"),
    "merge": Command("neon_ray.merge:MergeConfig", "neon_ray.merge:run", "write θ_r − w(θ_s − θ_r) as a checkpoint"),
    "import": Command("neon_ray.importer:ImportConfig", "neon_ray.importer:run_import", "import an official .pth release"),
}


def _resolve(target: str) -> Any:
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def _is_scalar(tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType")):
        return all(_is_scalar(a) for a in typing.get_args(tp) if a is not type(None))
    return tp in (int, float, str, bool) or origin is typing.Literal


def _parser_for(name: str, cmd: Command, sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    cls = _resolve(cmd.config)
    p = sub.add_parser(name, help=cmd.help, description=cmd.help)
    p.add_argument("--config", help="YAML file with the command's settings")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. sampler.steps=8 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        helptext = f.metadata.get("help", "")
        if tp is bool:
            p.add_argument(flag, dest=f"opt__{f.name}", action=argparse.BooleanOptionalAction,
                           default=None, help=helptext)
        elif _is_scalar(tp):
            p.add_argument(flag, dest=f"opt__{f.name}", default=None, metavar="V", help=helptext)
    for alias, dotted in cmd.aliases.items():
        p.add_argument("--" + alias, dest=f"alias__{dotted}", default=None, metavar="V",
                       help=f"same as --set {dotted}=V")
    return p


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; only subcommand ``only`` gets its flags (so imports stay lazy)."""
    parser = argparse.ArgumentParser(
        prog="neon-ray", description="Neon post-hoc generator improvement on Ray.",
        epilog="commands:\n" + "\n".join(f"  {n:<10} {c.help}" for n, c in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        if name == only:
            _parser_for(name, cmd, sub)
        else:
            sub.add_parser(name, help=cmd.help)
    return parser


def resolve_config(command: str, args: argparse.Namespace) -> Any:
    """The command's config from ``--config``, flags, aliases and ``--set``, in that order."""
    cls = _resolve(COMMANDS[command].config)
    overrides = []
    for key, value in vars(args).items():
        if value is None:
            continue
        if key.startswith("opt__"):
            overrides.append(f"{key[5:]}={_flag_value(value)}")
        elif key.startswith("alias__"):
            overrides.append(f"{key[7:]}={value}")
    return C.load(cls, args.config, overrides + list(args.set))


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    only = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(only).parse_args(argv)
    try:
        cfg = resolve_config(args.command, args)
    except C.ConfigError as e:
        print(f"neon-ray {args.command}: config error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(C.dump(cfg), end="")
        return 0
    try:
        _resolve(COMMANDS[args.command].run)(cfg)
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as e:
        print(f"neon-ray {args.command}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
