"""The commands that train, submit, watch and stop a run: train, launch, resume, sweep, coordinate,
cancel, status, logs (parse, call, print). `train` is the code path a Slurm task runs; the others are
login-node commands and import no torch.

Registered by `slurmvision.cli.build_parser`; heavy imports happen inside the commands.
"""

from __future__ import annotations

import argparse
import sys

from slurmvision.console import print_result as _print


def recipe_config(args):
    """The config of a recipe command's arguments (recipe, overrides, --cluster, --run-dir); cli's too."""
    from slurmvision.configs import load_config

    return load_config(
        args.recipe, args.overrides, cluster=getattr(args, "cluster", None), run_dir=getattr(args, "run_dir", None)
    )


def recipe_args(p: argparse.ArgumentParser, run_dir: bool = True) -> None:
    """The arguments of a command that starts from a recipe (train, launch, config show)."""
    p.add_argument("recipe", help="recipe name (shipped, or in ./configs/) or path to a .yaml file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3 trainer.precision=bf16")
    if run_dir:
        p.add_argument("--run-dir", help="run directory (default: runs/<recipe>)")


def cmd_train(args) -> int:
    from slurmvision.errors import RunError
    from slurmvision.extras import require_engine
    from slurmvision.launch.local import train_as_started, train_here
    from slurmvision.trainer.distributed import started_as_a_rank

    config = recipe_config(args)
    require_engine(config.trainer.engine)
    if started_as_a_rank():
        if args.nproc != 1:
            raise RunError(
                f"--nproc {args.nproc} under torchrun or srun: each process is one rank already; drop --nproc"
            )
        results, reports = train_as_started(config)
    else:
        from slurmvision.pretrained import fetch

        fetch(config.model)  # once here, not once per rank
        results, reports = train_here(config, nproc=args.nproc), True
    if not reports:  # another rank of the same run; rank 0 reports for all
        return 3 if results.get("interrupted") else 0
    if results.get("interrupted"):
        _print(
            results,
            args.json,
            lambda r: (
                f"stopped by {r['signal']} at step {r['step']} with a checkpoint saved; "
                f"run the same command with --run-dir {config.run.dir} to resume"
            ),
        )
        return 3
    _print(
        results,
        args.json,
        lambda r: (
            f"top-1 {r['top1']:.4f}  top-5 {r['top5']:.4f}  F1 {r['f1_macro']:.4f}  (step {r['step']})"
            if r.get("evaluated", True)
            else f"finished at step {r['step']} (not evaluated: data.synthetic)"
        ),
    )
    return 0


def cmd_launch(args) -> int:
    return _submit(recipe_config(args), args)


def cmd_resume(args) -> int:
    from slurmvision.configs import load_run_config

    return _submit(load_run_config(args.run, args.overrides, cluster=args.cluster), args)


def _submit(config, args) -> int:
    from slurmvision.extras import require_engine_for_jobs
    from slurmvision.launch.launcher import launch

    require_engine_for_jobs(config)
    if args.force and not args.dry_run:
        print(
            "slurmvision: warning: --force: not checking whether a job of this run is still queued or running; "
            "if one is, only one of the two can train (the trainer's run lock refuses the other)",
            file=sys.stderr,
        )
    launch(config, dry_run=args.dry_run, wait=args.wait, coordinate=args.coordinate, force=args.force)
    return 0


def cmd_status(args) -> int:
    from pathlib import Path

    from slurmvision.launch import sweep
    from slurmvision.launch.status import format_status, run_status

    run = args.run or args.run_dir
    if args.plot:
        from slurmvision.launch.timeline import plot_status

        drawn = plot_status(run, args.plot)
        _print(drawn, args.json, lambda d: f"wrote {d['plot']}: {d['attempts']} attempts" + _of_runs(d["runs"]))
    elif run and (Path(run) / sweep.SWEEP_FILE).is_file():
        _print(sweep.sweep_rows(Path(run)), args.json, sweep.format_sweep)
    else:
        _print(run_status(run), args.json, format_status)
    return 0


def _of_runs(runs: int) -> str:
    return f" of {runs} runs" if runs > 1 else ""


def cmd_sweep(args) -> int:
    from pathlib import Path

    from slurmvision.extras import require_engine_for_jobs
    from slurmvision.launch import sweep

    sweep_dir = Path(args.sweep_dir or Path("runs") / f"sweep-{Path(args.recipe).stem}")
    runs = sweep.plan(args.recipe, args.overrides, args.cluster, sweep_dir)
    require_engine_for_jobs(runs[0][1])
    if args.dry_run:
        print("\n".join(f"{name}: {config.run.dir}" for name, config in runs))
        return 0
    job_ids = sweep.submit_sweep(runs, sweep_dir, args.recipe)
    print(f"sweep {sweep_dir}: {len(runs)} runs submitted to {runs[0][1].cluster.name}")
    print("\n".join(f"  {name}: job {job_id}" for (name, _), job_id in zip(runs, job_ids)))
    if runs[0][1].cluster.executor == "slurm":
        print(
            "\n".join(
                f"  {line}"
                for line in sweep.coordinate(runs, job_ids, args.coordinate or runs[0][1].cluster.coordinate)
            )
        )
    print(f"  status: slurmvision status {sweep_dir}")
    return 0


def cmd_logs(args) -> int:
    from pathlib import Path

    from slurmvision.launch import logs

    run = Path(args.run)
    if args.coordinator:
        parts = logs.coordinator_parts(run)
    else:
        parts = [logs.log_part(run, rank=args.rank, attempt=logs.find_attempt(run, args.attempt), stream=args.stream)]
    for part in parts:
        print(part.title, file=sys.stderr, flush=True)  # the log itself goes to stdout, ready for grep
        sys.stdout.writelines(logs.lines_of(part))
    if args.follow:
        try:
            logs.follow(parts[-1].path)
        except KeyboardInterrupt:
            pass
    return 0


def cmd_coordinate(args) -> int:
    import logging

    from slurmvision.errors import RunError
    from slurmvision.launch.coordinator import Action, Coordinator

    run = args.run or args.run_dir
    if not run:
        raise RunError("give a run directory: slurmvision coordinate RUN_DIR")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.once:
        from slurmvision.launch.watcher import watch

        decision = watch(run)
        print(decision.message or f"run goes on ({decision.action})")
        return 1 if decision.action == Action.STOP else 0
    decision = Coordinator(run, poll_s=args.poll).run()
    print(decision.message)
    return 0 if decision.action == Action.FINISHED else 1


def cmd_cancel(args) -> int:
    from pathlib import Path

    from slurmvision.errors import RunError
    from slurmvision.launch.launcher import cancel

    run = args.run or args.run_dir
    if not run:
        raise RunError("give a run directory: slurmvision cancel RUN_DIR")
    cancelled = cancel(Path(run))
    print(
        f"cancelled jobs {', '.join(cancelled)}" if cancelled else "no job of the run was queued or running",
        f"; recorded in the ledger, {Path(run) / 'ledger'}",
        sep="",
    )
    return 0


def add_parsers(sub) -> None:
    for add in (_add_train, _add_launch, _add_resume, _add_sweep, _add_coordinate, _add_cancel, _add_status, _add_logs):
        add(sub)


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train on this machine (--nproc ranks), the code path a Slurm task runs; "
        "under torchrun or srun, as the rank it was started as",
    )
    recipe_args(p)
    p.add_argument("--nproc", type=int, default=1, help="ranks to start on this machine (not under torchrun or srun)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train)


def _submit_args(p: argparse.ArgumentParser) -> None:
    """The options of the commands that submit a run (launch, resume)."""
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and resolved config; submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job and print its result")
    p.add_argument(
        "--coordinate",
        nargs="?",
        const="watcher",
        choices=["watcher", "daemon", "none"],
        help="who resubmits what Slurm does not bring back: a chain of small watcher jobs inside Slurm "
        "(the default on Slurm profiles, set by cluster.coordinate; no login-node process), a "
        "background `slurmvision coordinate` on this node (log: RUN/logs/coordinator.log), or none",
    )
    p.add_argument(
        "--force", action="store_true", help="submit even if the run's newest job is still queued or running"
    )


def _add_launch(sub) -> None:
    p = sub.add_parser(
        "launch",
        help="submit a training run through submitit (into an existing run directory: "
        "go on with its run, as resume does)",
    )
    recipe_args(p)
    p.add_argument(
        "--cluster",
        default="local",
        help="cluster profile: local, devslurm, a100 (shipped), a name in ./configs/clusters/, or a path",
    )
    _submit_args(p)
    p.set_defaults(func=cmd_launch)


def _add_resume(sub) -> None:
    p = sub.add_parser(
        "resume",
        help="submit a run again from its saved config (RUN/config.yaml) and newest "
        "checkpoint; changes of what its checkpoints mean are refused",
    )
    p.add_argument("run", metavar="RUN", help="the run directory")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. trainer.log_every=100 cluster.time_min=600")
    p.add_argument("--cluster", help="cluster profile to run on instead of the saved cluster settings")
    _submit_args(p)
    p.set_defaults(func=cmd_resume)


def _add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep",
        help="one run per combination of values (optim.lr=1e-3,5e-4 ...), on Slurm as "
        "one job array; `status SWEEP_DIR` ranks them",
    )
    p.add_argument("recipe", help="recipe name (shipped, or in ./configs/) or path to a .yaml file")
    p.add_argument("overrides", nargs="*", help="dotted overrides; several values separated by commas are swept")
    p.add_argument("--cluster", default="local", help="cluster profile, as for launch")
    p.add_argument("--sweep-dir", help="where the runs go (default: runs/sweep-<recipe>)")
    p.add_argument(
        "--dry-run", action="store_true", help="validate every run's config and list the runs; submit nothing"
    )
    p.add_argument("--coordinate", choices=["watcher", "daemon", "none"], help="as for launch, for each run")
    p.set_defaults(func=cmd_sweep)


def _add_coordinate(sub) -> None:
    p = sub.add_parser("coordinate", help="watch a run, resubmit within budgets, keep the ledger")
    p.add_argument("run", nargs="?"), p.add_argument("--run-dir")
    p.add_argument("--poll", type=float, default=30.0, help="seconds between looks at the run's jobs")
    p.add_argument(
        "--once",
        action="store_true",
        help="look and act once, then leave a watcher job to look again when the run's job ends (what "
        "each watcher job runs; also restarts a broken chain)",
    )
    p.set_defaults(func=cmd_coordinate)


def _add_cancel(sub) -> None:
    p = sub.add_parser("cancel", help="cancel a run's training and watcher jobs (resume RUN to go on)")
    p.add_argument("run", nargs="?"), p.add_argument("--run-dir")
    p.set_defaults(func=cmd_cancel)


def _add_status(sub) -> None:
    p = sub.add_parser("status", help="a run at a glance")
    p.add_argument("run", nargs="?"), p.add_argument("--run-dir"), p.add_argument("--json", action="store_true")
    p.add_argument(
        "--plot",
        metavar="OUT.png",
        help="draw the run's attempts over wall time into a PNG instead (bars coloured by why each ended, "
        "with the steps each trained); for a sweep directory, one group of rows per run",
    )
    p.set_defaults(func=cmd_status)


def _add_logs(sub) -> None:
    from slurmvision.launch.logs import STREAMS

    p = sub.add_parser(
        "logs", help="the log of one rank of one attempt (default: rank 0 of the newest), or the coordinator's"
    )
    p.add_argument("run", metavar="RUN", help="the run directory")
    p.add_argument("--rank", type=int, default=0, help="the rank (default 0)")
    p.add_argument(
        "--attempt",
        metavar="K",
        help="the K-th attempt (1 the first, -1 the newest, the default) or JOB.RESTART as status lists them",
    )
    p.add_argument(
        "--stream",
        choices=STREAMS,
        default="stderr",
        help="stderr: what the rank wrote (log lines, tracebacks; the default); stdout: submitit's "
        "lines and prints; rank-log: RUN/logs/rank-NNNNN.log",
    )
    p.add_argument("--coordinator", action="store_true", help="the coordinator's and the watcher jobs' logs instead")
    p.add_argument("-f", "--follow", action="store_true", help="then print what is appended, until Ctrl-C")
    p.set_defaults(func=cmd_logs)
