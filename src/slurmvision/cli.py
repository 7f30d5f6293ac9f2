"""The `slurmvision` command: parse, call, print. Heavy imports happen inside the commands.

The commands live with their groups: here the data and config tools (shards, config, demo),
in launch.runs the run's own (train, launch, resume, sweep, coordinate, cancel, status, logs),
in launch.results those that read a trained run (eval, export, explain, checkpoint inspect).
The login-node commands (launch, status, coordinate, config, --help) never import torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from slurmvision.console import print_result as _print
from slurmvision.errors import SlurmVisionError
from slurmvision.launch import results, runs
from slurmvision.launch.runs import recipe_args, recipe_config


def cmd_shards_build(args) -> int:
    from slurmvision.shards.writer import build_shards

    manifest = build_shards(
        args.src,
        args.out,
        samples_per_shard=args.samples_per_shard,
        shard_size_mb=args.shard_size_mb,
        workers=args.workers,
        max_side=args.max_side,
        overwrite=args.overwrite,
    )
    for split, totals in manifest.splits.items():
        print(f"{split}: {totals['samples']} samples in {totals['shards']} shards")
    print(f"manifest: {args.out}/manifest.json; check with `slurmvision shards verify {args.out}`")
    return 0


def cmd_shards_verify(args) -> int:
    from slurmvision.shards.verify import verify_shards

    report = verify_shards(args.out, workers=args.workers, progress=not args.json)

    def text(data: dict) -> str:
        lines = [f"{p['shard']} {p['key']}: {p['problem']}" for p in data["bad"]]
        verdict = "ok" if data["ok"] else f"{len(data['bad'])} problem(s)"
        return "\n".join([*lines, f"{data['shards']} shards, {data['samples']} samples: {verdict}"])

    _print(report.to_json(), args.json, text)
    return 0 if report.ok else 1


def cmd_shards_stats(args) -> int:
    from slurmvision.shards.stats import shard_stats

    _print(shard_stats(args.out), args.json, lambda d: json.dumps(d, indent=1))
    return 0


def cmd_config_show(args) -> int:
    from slurmvision.configs import config_hash, to_dict, to_yaml

    config = recipe_config(args)
    if args.json:
        print(json.dumps({"config": to_dict(config), "config_hash": config_hash(config)}, indent=1))
    else:
        print(to_yaml(config), end="")
    return 0


def cmd_demo(args) -> int:
    from slurmvision.launch.demo import run_demo

    return run_demo(cluster=args.cluster, run_dir=args.run_dir, work_dir=args.work_dir, overrides=args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slurmvision", description="Train vision models on Slurm from WebDataset shards."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_shards, runs.add_parsers, results.add_parsers, _add_config, _add_demo):
        add(sub)
    return parser


def _add_shards(sub) -> None:
    shards = sub.add_parser("shards", help="build, verify and describe WebDataset shards").add_subparsers(
        dest="shards_command", required=True
    )
    p = shards.add_parser("build", help="ImageFolder tree (train/val/test) -> tar shards + manifest")
    p.add_argument("src"), p.add_argument("out")
    p.add_argument("--samples-per-shard", type=int)
    p.add_argument("--shard-size-mb", type=float)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-side", type=int, help="shrink larger images once (re-encodes them)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    p.set_defaults(func=cmd_shards_build)
    p = shards.add_parser("verify", help="check every shard against the manifest")
    (
        p.add_argument("out"),
        p.add_argument("--workers", type=int, default=1),
        p.add_argument("--json", action="store_true"),
    )
    p.set_defaults(func=cmd_shards_verify)
    p = shards.add_parser("stats", help="samples per split and class, image sizes, bytes")
    p.add_argument("out"), p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_shards_stats)


def _add_config(sub) -> None:
    config = sub.add_parser("config", help="show resolved configs").add_subparsers(dest="config_command", required=True)
    p = config.add_parser("show", help="print the resolved config of a recipe with overrides")
    recipe_args(p)
    p.add_argument("--cluster", default="local", help="cluster profile to merge (as launch does: local by default)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_config_show)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="digits end to end: ImageFolder -> shards -> 2-rank DDP -> eval")
    p.add_argument("overrides", nargs="*", help="dotted overrides for the digits-demo recipe")
    p.add_argument("--cluster", default="local", help="local (default) or devslurm")
    p.add_argument("--run-dir"), p.add_argument("--work-dir", default="runs/demo", help="where data and runs go")
    p.set_defaults(func=cmd_demo)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may come after options (`launch R --cluster x optim.lr=1`): argparse leaves them over.
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except SlurmVisionError as err:
        print(f"slurmvision: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("slurmvision: interrupted", file=sys.stderr)
        return 130
