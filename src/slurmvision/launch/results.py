"""The commands that read a trained run: eval, export, explain, checkpoint inspect (parse, call, print).
In launch/, above evaluate/ and the trainer: `eval` starts ranks (launch.evaluation).

Registered by `slurmvision.cli.build_parser`; heavy imports happen inside the commands.
"""

from __future__ import annotations

import argparse

from slurmvision.console import print_result as _print
from slurmvision.evaluate.tta import TTA_MODES


def cmd_checkpoint_inspect(args) -> int:
    from slurmvision.evaluate.inspect import inspect_checkpoint

    _print(inspect_checkpoint(args.checkpoint), args.json, lambda d: "\n".join(f"{k}: {v}" for k, v in d.items()))
    return 0


def cmd_eval(args) -> int:
    from slurmvision.launch.evaluation import evaluate_checkpoint
    from slurmvision.slurm.rundir import make_private

    make_private()  # what it writes into the run directory is private, as the rest of the run
    record = evaluate_checkpoint(
        args.checkpoint, split=args.split, tta=args.tta, data=args.data, scales=args.scales, nproc=args.nproc
    )
    _print(
        record,
        args.json,
        lambda r: (
            f"{r['data']}{', split ' + r['split'] if r['split'] else ''}: top-1 "
            f"{r['top1']:.4f}  top-5 {r['top5']:.4f}  F1 {r['f1_macro']:.4f}  "
            f"({r['samples']} samples, step {r['step']}, tta {r['tta']})\n"
            f"saved {r['files']['json']} (and .csv, .png)"
        ),
    )
    return 0


def cmd_export(args) -> int:
    from slurmvision.evaluate.export import export_run

    result = export_run(
        args.checkpoint,
        args.out,
        opset=args.opset,
        data_root=args.data_root,
        image_size=args.image_size,
        int8=args.int8,
        calibration=args.calibration,
        max_drop=args.max_drop,
    )
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
    return "\n".join(
        [
            f"wrote {r['path']}: INT8 ({q['mode']}), top-1 drop {q['drop']:.2f} points from float32 on "
            f"{q['val_samples']} val images (--max-drop {q['max_drop']:g}); onnxruntime on this CPU:",
            *rows,
        ]
    )


def cmd_explain(args) -> int:
    from slurmvision.evaluate.explain import explain_run

    results = explain_run(args.checkpoint, args.images, args.out, data_root=args.data_root, image_size=args.image_size)
    _print(
        results,
        args.json,
        lambda rs: "\n".join(
            f"{r['picture']}: " + ", ".join(f"{t['class']} {t['probability']:.1%}" for t in r["top"]) for r in rs
        ),
    )
    return 0


# A checkpoint's config, maybe of someone else's run, is data: its pipe: command is not run (configs.from_stored).
DATA_ROOT_HELP = "shards to read instead of the checkpoint's data.root (needed where that is a pipe: command)"


def _sizes(text: str) -> list[int]:
    try:
        return [int(size) for size in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give image sizes separated by commas, e.g. 224,256,288") from None


def add_parsers(sub) -> None:
    _add_eval(sub)
    _add_export(sub)
    _add_explain(sub)
    _add_checkpoint(sub)


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint on its run's data or yours (top-1/top-5/F1/confusion "
        "matrix, TTA); saves RUN/eval/<name>.json, .csv, .png",
    )
    p.add_argument(
        "checkpoint",
        metavar="RUN_OR_CHECKPOINT",
        help="run directory (its newest valid checkpoint) or checkpoint directory",
    )
    p.add_argument(
        "--data",
        help="shards (directory, URL, pipe: command) or an ImageFolder tree (SPLIT/<class>/ or "
        "<class>/ folders) to evaluate on with the checkpoint's classes, instead of its "
        "data.root (needed where that is a pipe: command: a stored one never runs)",
    )
    p.add_argument(
        "--split",
        help="split of the shards (default: the run's data.val_split), or split folder of the "
        "ImageFolder tree (default: val/; none where it holds class folders directly)",
    )
    p.add_argument(
        "--tta",
        default="none",
        choices=TTA_MODES,
        help="average the probabilities over flipped images and/or several image sizes",
    )
    p.add_argument(
        "--scales",
        type=_sizes,
        help="image sizes for the multiscale modes, e.g. 224,256,288 (default: "
        "the run's data.scales, or data.img_size and +/-32)",
    )
    p.add_argument("--nproc", type=int, default=1, help="ranks to evaluate with on this machine (each sample once)")
    p.add_argument("--json", action="store_true", help="print the saved record")
    p.set_defaults(func=cmd_eval)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export a checkpoint's model to ONNX (float32, or INT8 checked on the val split)")
    p.add_argument("checkpoint", metavar="RUN", help="run directory (its newest checkpoint) or checkpoint directory")
    p.add_argument("out", metavar="OUT.onnx", help="output .onnx file")
    p.add_argument(
        "--int8",
        nargs="?",
        const="dynamic",
        choices=["dynamic", "static"],
        help="quantize to INT8 with onnxruntime: dynamic (the default: activations scaled per batch) or "
        "static (calibrated activation ranges); reports top-1, size and latency of both models",
    )
    p.add_argument(
        "--calibration",
        metavar="SHARDS",
        help="shards whose train split calibrates --int8 static (default: the run's own data)",
    )
    p.add_argument(
        "--max-drop",
        type=float,
        default=1.0,
        metavar="POINTS",
        help="refuse an INT8 model whose val top-1 is more than this many points below float32's",
    )
    p.add_argument("--image-size", type=int, metavar="S", help="input side to export at (default: data.img_size)")
    p.add_argument("--opset", type=int, default=18), p.add_argument("--json", action="store_true")
    p.add_argument("--data-root", help=DATA_ROOT_HELP)
    p.set_defaults(func=cmd_export)


def _add_explain(sub) -> None:
    p = sub.add_parser("explain", help="Grad-CAM pictures of a checkpoint's model on images, with its top-3 classes")
    p.add_argument("checkpoint", metavar="RUN", help="run directory (its newest checkpoint) or checkpoint directory")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the pictures (DIR/<image name>.png)")
    p.add_argument("--image-size", type=int, metavar="S", help="input side (default: data.img_size)")
    p.add_argument("--data-root", help=DATA_ROOT_HELP), p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_explain)


def _add_checkpoint(sub) -> None:
    checkpoint = sub.add_parser("checkpoint", help="checkpoint tools").add_subparsers(
        dest="checkpoint_command", required=True
    )
    p = checkpoint.add_parser("inspect", help="step, epoch, world size, validity, params_sha256")
    p.add_argument("checkpoint"), p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_checkpoint_inspect)
