"""The `slurmvision` command: parse, call, print. Heavy imports happen inside the commands.

The login-node commands (launch, status, coordinate, config, --help) never import torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Optional

from slurmvision.errors import SlurmVisionError


def _print(data: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    print(json.dumps(data, indent=1, sort_keys=False) if as_json else text(data))


def cmd_shards_build(args) -> int:
    from slurmvision.shards.writer import build_shards

    manifest = build_shards(args.src, args.out, samples_per_shard=args.samples_per_shard, shard_size_mb=args.shard_size_mb,
                            workers=args.workers, max_side=args.max_side, overwrite=args.overwrite)
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


def _config(args):
    from slurmvision.configs import load_config

    return load_config(args.recipe, args.overrides, cluster=getattr(args, "cluster", None),
                       run_dir=getattr(args, "run_dir", None))


def cmd_config_show(args) -> int:
    from slurmvision.configs import config_hash, to_dict, to_yaml

    config = _config(args)
    if args.json:
        print(json.dumps({"config": to_dict(config), "config_hash": config_hash(config)}, indent=1))
    else:
        print(to_yaml(config), end="")
    return 0


def cmd_train(args) -> int:
    from slurmvision.errors import RunError
    from slurmvision.launch.local import train_as_started, train_here
    from slurmvision.trainer.distributed import started_as_a_rank

    config = _config(args)
    if started_as_a_rank():
        if args.nproc != 1:
            raise RunError(f"--nproc {args.nproc} under torchrun or srun: each process is one rank already; drop --nproc")
        results, reports = train_as_started(config)
    else:
        results, reports = train_here(config, nproc=args.nproc), True
    if not reports:  # another rank of the same run; rank 0 reports for all
        return 3 if results.get("interrupted") else 0
    if results.get("interrupted"):
        _print(results, args.json, lambda r: f"stopped by {r['signal']} at step {r['step']} with a checkpoint saved; "
                                             f"run the same command with --run-dir {config.run.dir} to resume")
        return 3
    _print(results, args.json, lambda r: f"top-1 {r['top1']:.4f}  top-5 {r['top5']:.4f}  F1 {r['f1_macro']:.4f}  (step {r['step']})")
    return 0


def cmd_launch(args) -> int:
    from slurmvision.launch.launcher import launch

    config = _config(args)
    if args.force and not args.dry_run:
        print("slurmvision: warning: --force: not checking whether a job of this run is still queued or running; "
              "if one is, only one of the two can train (the trainer's run lock refuses the other)", file=sys.stderr)
    launch(config, dry_run=args.dry_run, wait=args.wait, coordinate=args.coordinate, force=args.force)
    return 0


def cmd_status(args) -> int:
    from slurmvision.launch.status import format_status, run_status

    _print(run_status(args.run or args.run_dir), args.json, format_status)
    return 0


def cmd_coordinate(args) -> int:
    import logging

    from slurmvision.errors import RunError
    from slurmvision.slurm.coordinator import Coordinator

    run = args.run or args.run_dir
    if not run:
        raise RunError("give a run directory: slurmvision coordinate RUN_DIR")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.once:
        from slurmvision.slurm.watcher import watch

        decision = watch(run)
        print(decision.message or f"run goes on ({decision.action})")
        return 1 if decision.action == "stop" else 0
    decision = Coordinator(run, poll_s=args.poll).run()
    print(decision.message)
    return 0 if decision.action == "finished" else 1


def cmd_cancel(args) -> int:
    from pathlib import Path

    from slurmvision.errors import RunError
    from slurmvision.launch.launcher import cancel

    run = args.run or args.run_dir
    if not run:
        raise RunError("give a run directory: slurmvision cancel RUN_DIR")
    cancelled = cancel(Path(run))
    print(f"cancelled jobs {', '.join(cancelled)}" if cancelled else "no job of the run was queued or running",
          f"; recorded in the ledger, {Path(run) / 'ledger'}", sep="")
    return 0


def cmd_checkpoint_inspect(args) -> int:
    from slurmvision.evaluate.inspect import inspect_checkpoint

    _print(inspect_checkpoint(args.checkpoint), args.json, lambda d: "\n".join(f"{k}: {v}" for k, v in d.items()))
    return 0


def cmd_eval(args) -> int:
    from slurmvision.evaluate.run import evaluate_checkpoint
    from slurmvision.slurm.rundir import make_private

    make_private()  # what it writes into the run directory is private, as the rest of the run
    record = evaluate_checkpoint(args.checkpoint, split=args.split, tta=args.tta, data=args.data, scales=args.scales,
                                 nproc=args.nproc)
    _print(record, args.json, lambda r: f"{r['data']}{', split ' + r['split'] if r['split'] else ''}: top-1 "
                                        f"{r['top1']:.4f}  top-5 {r['top5']:.4f}  F1 {r['f1_macro']:.4f}  "
                                        f"({r['samples']} samples, step {r['step']}, tta {r['tta']})\n"
                                        f"saved {r['files']['json']} (and .csv, .png)")
    return 0


def cmd_export(args) -> int:
    from slurmvision.evaluate.export import export_run

    result = export_run(args.checkpoint, args.out, opset=args.opset, data_root=args.data_root,
                        image_size=args.image_size, int8=args.int8, calibration=args.calibration,
                        max_drop=args.max_drop)
    _print(result, args.json, _export_text)
    return 0


def _export_text(r: dict) -> str:
    if "int8" not in r:
        return f"wrote {r['path']} (max |onnx - torch| = {r['max_abs_diff']:.2e})"
    q = r["int8"]
    batches = list(q["models"]["fp32"]["latency_ms"])
    rows = [f"{'':8}{'top-1':>8}{'MB':>9}" + "".join(f"{f'ms/batch {b}':>14}" for b in batches)]
    for name, m in q["models"].items():
        times = "".join(f"{m['latency_ms'][b]:14.1f}" for b in batches)
        rows.append(f"{name:8}{m['top1']:8.4f}{m['size_mb']:9.2f}{times}")
    return "\n".join([f"wrote {r['path']}: INT8 ({q['mode']}), top-1 drop {q['drop']:.2f} points from float32 on "
                      f"{q['val_samples']} val images (--max-drop {q['max_drop']:g}); onnxruntime on this CPU:", *rows])


def cmd_explain(args) -> int:
    from slurmvision.evaluate.explain import explain_run

    results = explain_run(args.checkpoint, args.images, args.out, data_root=args.data_root, image_size=args.image_size)
    _print(results, args.json, lambda rs: "\n".join(
        f"{r['picture']}: " + ", ".join(f"{t['class']} {t['probability']:.1%}" for t in r["top"]) for r in rs))
    return 0


def cmd_demo(args) -> int:
    from slurmvision.launch.demo import run_demo

    return run_demo(cluster=args.cluster, run_dir=args.run_dir, work_dir=args.work_dir, overrides=args.overrides)


# A checkpoint's config, maybe of someone else's run, is data: its pipe: command is not run (configs.from_stored).
DATA_ROOT_HELP = "shards to read instead of the checkpoint's data.root (needed where that is a pipe: command)"


def _sizes(text: str) -> list[int]:
    try:
        return [int(size) for size in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give image sizes separated by commas, e.g. 224,256,288") from None


def _recipe_args(p: argparse.ArgumentParser, run_dir: bool = True) -> None:
    p.add_argument("recipe", help="recipe name (see configs/) or path to a .yaml file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 trainer.precision=bf16")
    if run_dir:
        p.add_argument("--run-dir", help="run directory (default: runs/<recipe>)")


def build_parser() -> argparse.ArgumentParser:
    from slurmvision.evaluate.tta import TTA_MODES

    parser = argparse.ArgumentParser(prog="slurmvision", description="Train vision models on Slurm from WebDataset shards.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    shards = sub.add_parser("shards", help="build, verify and describe WebDataset shards").add_subparsers(dest="shards_command", required=True)
    p = shards.add_parser("build", help="ImageFolder tree (train/val/test) -> tar shards + manifest")
    p.add_argument("src"), p.add_argument("out")
    p.add_argument("--samples-per-shard", type=int)
    p.add_argument("--shard-size-mb", type=float)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--max-side", type=int, help="shrink larger images once (re-encodes them)")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT")
    p.set_defaults(func=cmd_shards_build)
    p = shards.add_parser("verify", help="check every shard against the manifest")
    p.add_argument("out"), p.add_argument("--workers", type=int, default=1), p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_shards_verify)
    p = shards.add_parser("stats", help="samples per split and class, image sizes, bytes")
    p.add_argument("out"), p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_shards_stats)

    p = sub.add_parser("train", help="train on this machine (--nproc ranks), the code path a Slurm task runs; "
                                     "under torchrun or srun, as the rank it was started as")
    _recipe_args(p)
    p.add_argument("--nproc", type=int, default=1, help="ranks to start on this machine (not under torchrun or srun)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("launch", help="submit a training run through submitit")
    _recipe_args(p)
    p.add_argument("--cluster", default="local", help="cluster profile (configs/clusters/): local, devslurm, a100, or a path")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and resolved config; submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    p.add_argument("--coordinate", nargs="?", const="watcher", choices=["watcher", "daemon", "none"],
                   help="who resubmits what Slurm does not bring back: a chain of small watcher jobs inside Slurm "
                        "(the default on Slurm profiles, set by cluster.coordinate; no login-node process), a "
                        "background `slurmvision coordinate` on this node (log: RUN/logs/coordinator.log), or none")
    p.add_argument("--force", action="store_true",
                   help="submit even if the run's newest job is still queued or running")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("coordinate", help="watch a run, resubmit within budgets, keep the ledger")
    p.add_argument("run", nargs="?"), p.add_argument("--run-dir")
    p.add_argument("--poll", type=float, default=30.0, help="seconds between looks at the run's jobs")
    p.add_argument("--once", action="store_true",
                   help="look and act once, then leave a watcher job to look again when the run's job ends (what "
                        "each watcher job runs; also restarts a broken chain)")
    p.set_defaults(func=cmd_coordinate)

    p = sub.add_parser("cancel", help="cancel a run's training and watcher jobs (relaunch the same config to resume)")
    p.add_argument("run", nargs="?"), p.add_argument("--run-dir")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("status", help="a run at a glance")
    p.add_argument("run", nargs="?"), p.add_argument("--run-dir"), p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("eval", help="evaluate a checkpoint on its run's data or yours (top-1/top-5/F1/confusion "
                                    "matrix, TTA); saves RUN/eval/<name>.json, .csv, .png")
    p.add_argument("checkpoint", metavar="RUN_OR_CHECKPOINT", help="run directory (its newest valid checkpoint) or "
                                                                   "checkpoint directory")
    p.add_argument("--data", help="shards (directory, URL, pipe: command) or an ImageFolder tree (SPLIT/<class>/ or "
                                  "<class>/ folders) to evaluate on with the checkpoint's classes, instead of its "
                                  "data.root (needed where that is a pipe: command: a stored one never runs)")
    p.add_argument("--split", help="split of the shards (default: the run's data.val_split), or split folder of the "
                                   "ImageFolder tree (default: val/; none where it holds class folders directly)")
    p.add_argument("--tta", default="none", choices=TTA_MODES,
                   help="average the probabilities over flipped images and/or several image sizes")
    p.add_argument("--scales", type=_sizes, help="image sizes for the multiscale modes, e.g. 224,256,288 (default: "
                                                 "the run's data.scales, or data.img_size and +/-32)")
    p.add_argument("--nproc", type=int, default=1, help="ranks to evaluate with on this machine (each sample once)")
    p.add_argument("--json", action="store_true", help="print the saved record")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="export a checkpoint's model to ONNX (float32, or INT8 checked on the val split)")
    p.add_argument("checkpoint", metavar="RUN", help="run directory (its newest checkpoint) or checkpoint directory")
    p.add_argument("out", metavar="OUT.onnx", help="output .onnx file")
    p.add_argument("--int8", nargs="?", const="dynamic", choices=["dynamic", "static"],
                   help="quantize to INT8 with onnxruntime: dynamic (the default: activations scaled per batch) or "
                        "static (calibrated activation ranges); reports top-1, size and latency of both models")
    p.add_argument("--calibration", metavar="SHARDS",
                   help="shards whose train split calibrates --int8 static (default: the run's own data)")
    p.add_argument("--max-drop", type=float, default=1.0, metavar="POINTS",
                   help="refuse an INT8 model whose val top-1 is more than this many points below float32's")
    p.add_argument("--image-size", type=int, metavar="S", help="input side to export at (default: data.img_size)")
    p.add_argument("--opset", type=int, default=18), p.add_argument("--json", action="store_true")
    p.add_argument("--data-root", help=DATA_ROOT_HELP)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("explain", help="Grad-CAM pictures of a checkpoint's model on images, with its top-3 classes")
    p.add_argument("checkpoint", metavar="RUN", help="run directory (its newest checkpoint) or checkpoint directory")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the pictures (DIR/<image name>.png)")
    p.add_argument("--image-size", type=int, metavar="S", help="input side (default: data.img_size)")
    p.add_argument("--data-root", help=DATA_ROOT_HELP), p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_explain)

    config = sub.add_parser("config", help="show resolved configs").add_subparsers(dest="config_command", required=True)
    p = config.add_parser("show", help="print the resolved config of a recipe with overrides")
    _recipe_args(p)
    p.add_argument("--cluster", default="local", help="cluster profile to merge (as launch does: local by default)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_config_show)

    checkpoint = sub.add_parser("checkpoint", help="checkpoint tools").add_subparsers(dest="checkpoint_command", required=True)
    p = checkpoint.add_parser("inspect", help="step, epoch, world size, validity, params_sha256")
    p.add_argument("checkpoint"), p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_checkpoint_inspect)

    p = sub.add_parser("demo", help="digits end to end: ImageFolder -> shards -> 2-rank DDP -> eval")
    p.add_argument("overrides", nargs="*", help="dotted overrides for the digits-demo recipe")
    p.add_argument("--cluster", default="local", help="local (default) or devslurm")
    p.add_argument("--run-dir"), p.add_argument("--work-dir", default="runs/demo", help="where data and runs go")
    p.set_defaults(func=cmd_demo)
    return parser


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
