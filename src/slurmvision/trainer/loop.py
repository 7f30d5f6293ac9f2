"""The training job every rank runs: read top to bottom, `Trainer.fit` is the whole loop."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from slurmvision.configs import Config, config_hash, to_dict
from slurmvision.configs.compare import meaningful_changes
from slurmvision.errors import CheckpointError, DataError, RunError, SlurmVisionError
from slurmvision.models import build_model, build_teacher
from slurmvision.shards.manifest import Manifest
from slurmvision.shards.reader import LoaderState, ShardSet, TrainReader
from slurmvision.shards.transforms import DeviceAugment
from slurmvision.slurm.causes import LIMIT_AHEAD, WARNING_SIGNALS
from slurmvision.slurm.ledger import AttemptRecorder
from slurmvision.slurm.rundir import make_private
from slurmvision.trainer import distributed
from slurmvision.trainer.checkpoint import CheckpointManager, params_sha256, rng_state, set_rng_state
from slurmvision.trainer.deadline import StepTimes, TimeLimit, lead_time, stop_deadline
from slurmvision.trainer.distributed import DistEnv, all_reduce_sum
from slurmvision.trainer.engine import build_engine
from slurmvision.trainer.evaluation import evaluate
from slurmvision.trainer.monitor import Monitor, setup_logging
from slurmvision.trainer.run_lock import run_lock
from slurmvision.trainer.schedule import build_schedule
from slurmvision.trainer.signals import StopRequest, reported_signal

log = logging.getLogger("slurmvision.trainer")
VERSION = 1


def seed_everything(*entropy: int) -> None:
    seed = int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    if targets.ndim == 2:  # soft targets from mixup/cutmix (smoothing already applied)
        return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target KL(teacher || student) at a temperature, scaled by T² to keep its gradients' size."""
    return F.kl_div(F.log_softmax(student.float() / temperature, dim=-1), F.log_softmax(teacher.float() / temperature, dim=-1),
                    reduction="batchmean", log_target=True) * temperature ** 2


class Trainer:
    def __init__(self, config: Config, env: DistEnv, device: torch.device):
        self.config, self.env, self.device = config, env, device
        # First: a signal while the model builds and the checkpoint loads is kept for the first step
        # boundary, not left to the default action (USR1 kills) or to submitit's handler.
        self.stop = StopRequest().install()
        self.run_dir = Path(config.run.dir)
        trainer = config.trainer
        self.num_classes = config.model.num_classes or ShardSet.load(config.data.root, config.data.train_split).num_classes
        self.classes = Manifest.load(config.data.root).classes  # kept in each checkpoint's meta, for `eval --data`
        self._gradcam_images: Optional[torch.Tensor] = None  # the val images of trainer.gradcam_images, read once
        seed_everything(trainer.seed, 0)  # the same initial weights on every rank
        self.model = build_model(config.model, self.num_classes)
        # An elastic run on fewer ranks than planned accumulates more: the global batch stays.
        self.grad_accum = config.grad_accum_at(env.world_size)
        self.engine = build_engine(self.model, config, device, env.local_rank, grad_accum=self.grad_accum)
        distill = config.model.distill
        self.teacher = build_teacher(distill, self.num_classes).to(device) if distill.teacher else None
        self.ema = None
        if config.model.ema_decay:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=config.model.ema_decay)
        self.checkpoints = CheckpointManager(self.run_dir / "checkpoints", env, trainer.keep_checkpoints, device)
        # saved_step: the step whose state is on disk (saved or resumed from): a stop then saves nothing.
        self.step, self.samples_seen, self.resumed_from, self.saved_step = 0, 0, None, None
        self.times = StepTimes()
        loader_state = self._resume()
        self.reader = TrainReader(config.data, seed=trainer.seed, rank=env.rank, world_size=env.world_size,
                                  state=loader_state, pin_memory=device.type == "cuda")
        self.global_batch = config.data.batch_size * env.world_size * self.grad_accum
        # After _resume: loading the optimizer replaces the param groups the schedule writes to.
        self.schedule_at = build_schedule(self.engine.optimizer, config, self.global_batch,
                                          self.reader.samples_per_epoch)
        self.augment = DeviceAugment(config.data, self.num_classes, device, trainer.seed, env.rank)
        self.monitor = Monitor(self.run_dir, env, self.step, trainer.max_steps, to_dict(config),
                               config.run.share_with_group)
        stop_before_limit = env.is_main and config.cluster.executor == "slurm" and config.cluster.stop_before_limit
        self.time_limit = TimeLimit(env.job_id if stop_before_limit else None, self.stop)
        # Buffers a forward pass changes (BatchNorm statistics): a step cut short puts them back.
        persistent = self.model.state_dict().keys()
        self.persistent_buffers = [b for name, b in self.model.named_buffers() if name in persistent]
        self.record = AttemptRecorder(self.run_dir, env.job_id, env.restart_count, enabled=env.is_main)
        self.record.started(world_size=env.world_size, step=self.step, checkpoint=self.resumed_from)
        if env.world_size != config.cluster.world_size and config.cluster.elastic:
            resized = f"{env.world_size} of {config.cluster.world_size} planned ranks"
            log.warning("training on %s: %d micro-batches per step instead of %d keep the global batch of %d", resized,
                        self.grad_accum, trainer.grad_accum, self.global_batch)
            self.record.note(f"{resized}, gradient accumulation {self.grad_accum} (global batch {self.global_batch})")

    def _resume(self) -> Optional[LoaderState]:
        resumed = self.checkpoints.resume()
        if resumed is None:
            seed_everything(self.config.trainer.seed, 1, self.env.rank)
            self._trim_audit()  # an attempt killed before its first save: all it recorded is redone
            return None
        checkpoint, shared = resumed.checkpoint, resumed.shared
        self._check_config(json.loads(shared["config"]), int(shared.get("global_batch", 0)), checkpoint.path)
        self.engine.load_state_dict(shared["engine"])
        if self.ema is not None and "ema" in shared:
            self.ema.module.load_state_dict(shared["ema"])
        self.step, self.samples_seen = int(shared["step"]), int(shared["samples_seen"])
        # What the last attempt measured: a stop soon after this restart plans with it.
        self.times.save_s, self.times.eval_s = (float(checkpoint.meta.get(k, 0.0)) for k in ("last_save_s", "last_eval_s"))
        if resumed.own is not None:
            set_rng_state(resumed.own["rng"])
        else:  # a new world size: ranks draw fresh, still reproducible, random streams
            seed_everything(self.config.trainer.seed, 2, self.step, self.env.rank)
        log.info("resumed from %s (step %d)", checkpoint.path, self.step)
        self.resumed_from, self.saved_step = str(checkpoint.path), self.step
        self._trim_audit()
        return LoaderState.from_dict(shared["loader"])

    def _check_config(self, saved: dict, saved_global_batch: int, path: Path) -> None:
        changes = meaningful_changes(saved, to_dict(self.config))
        global_batch = self.config.data.batch_size * self.env.world_size * self.grad_accum
        if saved_global_batch and saved_global_batch != global_batch:
            changes.append(f"global batch (batch_size x ranks x grad_accum): {saved_global_batch} -> {global_batch}")
        if not changes:
            return
        if self.config.trainer.allow_config_change:
            log.warning("resuming %s with config changes (allowed): %s", path, "; ".join(changes))
            return
        raise CheckpointError(f"the config differs from the one {path} was trained with: {'; '.join(changes)}. "
                              "Undo the changes (for fewer ranks raise trainer.grad_accum to keep the global batch), "
                              "use a new --run-dir, or pass trainer.allow_config_change=true")

    def fit(self) -> dict:
        batches = iter(self.reader)
        try:
            return self._fit(batches)
        finally:
            # Shut the loader workers down by the loader's own protocol on any way out: they
            # ignore SIGTERM (see shards.reader), so multiprocessing's exit-time terminate()
            # would wait for them forever.
            batches.close()

    def _fit(self, batches) -> dict:
        trainer = self.config.trainer
        last_save, bad_steps = time.monotonic(), 0
        while self.step < trainer.max_steps:
            started = time.monotonic()
            # The data position before this step's batches: a stop agreed below saves this one.
            position = self.reader.state.to_dict()
            step_batches, error = [], None
            try:
                # A rank with a stop pending fetches nothing: its flag alone stops every rank below.
                for _ in range(0 if self.stop.requested else self.grad_accum):
                    step_batches.append(next(batches))
            except DataError as err:
                error = err
            time_due = trainer.checkpoint_every_minutes and time.monotonic() - last_save > trainer.checkpoint_every_minutes * 60
            evaluates_next = bool(trainer.eval_every) and (self.step + 1) % trainer.eval_every == 0
            limit_ahead = self.time_limit.too_close(self.times, evaluates_next)
            # All ranks agree at each step boundary, before the step's collectives: one rank's
            # data error or stop signal is enough to stop every rank at the same step.
            errors, due, warnings, terms, ahead = all_reduce_sum(
                [float(error is not None), float(bool(time_due) and self.env.is_main), float(self.stop.is_warning),
                 float(self.stop.requested and not self.stop.is_warning), float(limit_ahead)], self.device)
            if errors:
                if error is not None:
                    raise error
                raise DataError("another rank stopped on bad data; see its log for the samples")
            if warnings or terms:
                return self._stop(reported_signal(warnings, self.config.cluster.signal), position)
            if ahead:
                log.warning("the time limit is near: one more step and a save (about %.0fs) would not fit; stopping at "
                            "step %d", self.times.next_step_and_save(evaluates_next), self.step)
                return self._stop(LIMIT_AHEAD, position)
            data_wait = time.monotonic() - started
            loss_sum, images = 0.0, 0
            # The last safe point, should the step have to be cut short: the state at its start.
            step_start = (rng_state(), [b.clone() for b in self.persistent_buffers]) if len(step_batches) > 1 else None
            for i, batch in enumerate(step_batches):
                micro_started = time.monotonic()
                loss_sum += self._micro_step(batch, i, sync=i == len(step_batches) - 1)
                self.times.micro.append(time.monotonic() - micro_started)
                images += len(batch.keys)
                agreed_signal = self._cut_short(len(step_batches) - 1 - i) if i < len(step_batches) - 1 else None
                if agreed_signal:
                    return self._stop_mid_step(agreed_signal, position, step_start, done=i + 1)
            self._audit(step_batches)
            loss_total, nonfinite, images_total, bad_total, stopping = all_reduce_sum(
                [loss_sum, float(not math.isfinite(loss_sum)), images, sum(len(b.bad) for b in step_batches),
                 float(self.stop.requested)], self.device)
            lr, weight_decay = self.schedule_at(self.step)
            if nonfinite:
                self.engine.skip()
                self.saved_step = None  # its batches are consumed: the data position on disk is behind
                bad_steps += 1
                log.warning("non-finite loss at step %d on %d rank(s): step skipped (%d in a row)", self.step, int(nonfinite), bad_steps)
                if bad_steps >= trainer.nonfinite_budget:
                    raise RunError(f"{bad_steps} non-finite steps in a row at step {self.step}: stopped; the last good "
                                   f"checkpoint is kept. Lower optim.lr, set optim.clip_grad, or use trainer.precision=bf16")
                continue
            bad_steps = 0
            grad_norm = self.engine.step()
            if self.ema is not None:
                self.ema.update(self.model, step=self.step)
            self.step += 1
            self.samples_seen += int(images_total)
            elapsed = time.monotonic() - started
            self.times.steps.append(elapsed)
            self.record.progress(self.step, elapsed)
            if self.step % trainer.log_every == 0 or self.step == trainer.max_steps:
                loss = loss_total / self.env.world_size / self.grad_accum
                self.monitor.scalars(self.step, {
                    "train/loss": loss, "train/lr": lr, "train/weight_decay": weight_decay,
                    "train/images_per_s": images_total / elapsed,
                    "train/step_time_s": elapsed, "train/data_wait_s": data_wait, "train/grad_norm": grad_norm,
                    "train/loss_scale": self.engine.loss_scale, "train/resolution": step_batches[-1].resolution,
                    "train/bad_samples": bad_total, "train/gpu_mem_gib": self.monitor.memory(self.device),
                })
                self.monitor.progress(self.step, loss, images_total / elapsed)
            if stopping:  # a stop is pending: its save comes at the next boundary, nothing else before it
                continue
            if self.step % trainer.checkpoint_every == 0 or due:
                self.save()
                last_save = time.monotonic()
            if trainer.eval_every and self.step % trainer.eval_every == 0 and self.step < trainer.max_steps:
                self.evaluate()
        if self.saved_step != self.step:
            self.save()
        results = self.evaluate()
        self.monitor.final(self.step, results)
        self.monitor.close()
        self.record.ended("finished", self.step)
        return results

    def _cut_short(self, micro_left: int) -> Optional[str]:
        """Between micro-steps: the agreed signal if some rank would miss its deadline by finishing the step."""
        deadline = stop_deadline(self.stop, self.config.cluster)
        late = deadline is not None and time.monotonic() + self.times.to_finish(micro_left) > deadline
        warnings, late_ranks = all_reduce_sum([float(self.stop.is_warning), float(late)], self.device)
        return reported_signal(warnings, self.config.cluster.signal) if late_ranks else None

    def _stop_mid_step(self, agreed_signal: str, position: dict, step_start: tuple, done: int) -> dict:
        rng, buffers = step_start
        for buffer, saved in zip(self.persistent_buffers, buffers):
            buffer.copy_(saved)
        log.warning("step %d cannot finish before the %s deadline: saving the state from its start instead (the %d "
                    "micro-batch(es) done are redone after the restart)", self.step + 1, agreed_signal, done)
        return self._stop(agreed_signal, position, rng)

    def _stop(self, agreed_signal: str, position: dict, rng: Optional[dict] = None) -> dict:
        """Save this step on every rank and report; the caller (Slurm job, local run) requeues or exits.

        Every rank reports the same signal: a time-limit warning if any rank got one.
        """
        started = time.monotonic()
        on_disk = self.saved_step == self.step  # saved by the last boundary, or resumed from: the same state
        if not on_disk:
            self.save(position, rng)
        waited = started - self.stop.received_at if self.stop.received_at else 0.0
        took = waited + time.monotonic() - started
        cluster = self.config.cluster
        warning = agreed_signal in WARNING_SIGNALS
        lead = lead_time(cluster, warning)
        log.warning("stopped by %s (this rank: %s) at step %d: checkpoint saved %.1fs after the signal%s", agreed_signal,
                    self.stop.name, self.step, took, " (it was on disk already)" if on_disk else "")
        if agreed_signal != LIMIT_AHEAD and cluster.executor == "slurm" and took > 0.8 * lead:
            advice = ("raise cluster.signal_delay_s" if warning else
                      "Slurm's KillWait is tight for this run: save more often (trainer.checkpoint_every_minutes)")
            log.warning("saving took %.0f%% of the %ds Slurm leaves after %s: %s", 100 * took / lead, lead,
                        agreed_signal, advice)
        self.monitor.close()
        self.record.ended("stopped", self.step, signal=agreed_signal)
        return {"interrupted": True, "signal": agreed_signal, "step": self.step}

    def _micro_step(self, batch, micro: int, sync: bool) -> float:
        images, targets = self.augment(batch.images, batch.targets, self.step * self.grad_accum + micro)
        empty = len(images) == 0
        if empty:  # every sample of this batch was bad: still take part in the gradient all-reduce
            images = torch.zeros(1, 3, batch.resolution, batch.resolution, device=self.device)
            targets = torch.zeros(1, dtype=torch.int64, device=self.device)
        if self.config.model.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self.engine.forward_context(sync):
            logits = self.engine.model(images)
            loss = loss_fn(logits, targets, self.config.data.label_smoothing)
            if self.teacher is not None:
                distill = self.config.model.distill
                with torch.no_grad():
                    teacher_logits = self.teacher(images)
                loss = (1 - distill.weight) * loss + distill.weight * distill_loss(logits, teacher_logits, distill.temperature)
            if empty:
                loss = loss * 0.0
        self.engine.backward(loss / self.grad_accum)
        return float(loss.detach())

    def save(self, position: Optional[dict] = None, rng: Optional[dict] = None) -> None:
        """Collective checkpoint; `position` and `rng` are the data position and RNG states if not the current ones."""
        started = time.monotonic()
        shared = {"engine": self.engine.state_dict(), "step": self.step, "samples_seen": self.samples_seen,
                  "loader": position or self.reader.state.to_dict(), "version": VERSION, "global_batch": self.global_batch,
                  "config": json.dumps(to_dict(self.config))}
        if self.ema is not None:
            shared["ema"] = self.ema.module.state_dict()
        meta = {"step": self.step, "epoch": shared["loader"]["epoch"], "samples_seen": self.samples_seen,
                "world_size": self.env.world_size, "engine": self.config.trainer.engine,
                "config_hash": config_hash(self.config), "params_sha256": params_sha256(shared["engine"]["model"]),
                "version": VERSION, "time": time.time(), "last_save_s": self.times.save_s,
                "last_eval_s": self.times.eval_s, "classes": self.classes}
        path = self.checkpoints.save(self.step, shared, {"rng": rng or rng_state()}, meta)
        self.saved_step = self.step
        self.record.progress(self.step, saved=self.step)
        self.times.save_s = time.monotonic() - started
        log.info("checkpoint %s saved in %.1fs", path.name, self.times.save_s)

    def evaluate(self) -> dict:
        started = time.monotonic()
        live = self.engine.eval_module(self._empty_copy)  # the trained weights, whole on this rank
        model = self.ema.module if self.ema is not None else live
        results = evaluate(model, self.config, self.env, self.device, self.num_classes)
        self.times.eval_s = time.monotonic() - started
        results.update(step=self.step, params_sha256=params_sha256(live.state_dict()))
        image = results.pop("confusion_image", None)
        self.monitor.eval(self.step, results, image)
        if self.env.is_main and self.config.trainer.gradcam_images:
            self._log_gradcam(model)
        if self.env.is_main:
            out = self.run_dir / "eval"
            out.mkdir(parents=True, exist_ok=True)
            (out / f"step-{self.step:08d}.json").write_text(json.dumps(results, indent=1))
            log.info("eval at step %d: top-1 %.4f top-5 %.4f F1 %.4f", self.step, results["top1"], results["top5"], results["f1_macro"])
        return results

    def _log_gradcam(self, model: torch.nn.Module) -> None:
        """Grad-CAM overlays of the same first val images at each evaluation, to watch what the model
        looks at as it trains. Without the optional grad-cam package: one warning, no pictures."""
        from slurmvision.evaluate.explain import gradcam_pictures, require_gradcam
        from slurmvision.shards.reader import eval_batches

        if self._gradcam_images is None:
            try:
                require_gradcam()
            except SlurmVisionError as err:
                log.warning("%s; set trainer.gradcam_images=0 to silence this", err)
                self._gradcam_images = torch.empty(0)
                return
            batches = eval_batches(self.config.data, self.config.data.val_split, rank=0, world_size=1)
            try:
                self._gradcam_images = next(batches).images[:self.config.trainer.gradcam_images]
            finally:
                batches.close()
        if not len(self._gradcam_images):
            return
        pictures = gradcam_pictures(model, self._gradcam_images.to(self.device), self.classes, self.augment.normalize)
        self.monitor.pictures(self.step, "gradcam", pictures)

    def _empty_copy(self) -> torch.nn.Module:
        """The model's architecture, without downloading or loading weights or drawing from the run's RNG."""
        with torch.random.fork_rng(devices=[]):
            return build_model(dataclasses.replace(self.config.model, pretrained=False, finetune_from=None),
                               self.num_classes)

    def _audit_file(self) -> Path:
        return self.run_dir / "audit" / f"rank-{self.env.rank:05d}.jsonl"

    def _audit(self, batches) -> None:
        if not self.config.data.audit:
            return
        path = self._audit_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            for batch in batches:
                f.write(json.dumps({"step": self.step, "epoch": batch.epoch, "batch": batch.index, "keys": batch.keys}) + "\n")

    def _trim_audit(self) -> None:
        """Forget what an interrupted attempt consumed after the checkpoint we resume from.

        Rank 0 trims every rank's file (ranks may be gone after a world-size change); the
        others append only after the step's first collective, so after the trim.
        """
        if not (self.config.data.audit and self.env.is_main):
            return
        for path in self._audit_file().parent.glob("rank-*.jsonl"):
            # A rank killed mid-write leaves a torn last line: what it recorded was not trained for good.
            kept = [line for line in path.read_text().split("\n")[:-1] if json.loads(line)["step"] < self.step]
            path.write_text("".join(line + "\n" for line in kept))


def train(config: Config, env: Optional[DistEnv] = None) -> dict:
    """Entry point of one rank (a Slurm task, a submitit task or a `train --nproc` process)."""
    env = env or distributed.from_environment()
    run_dir = Path(config.run.dir)
    make_private()  # the run directory holds what later runs as its owner (slurmvision.slurm.rundir)
    setup_logging(env, run_dir / "logs" / f"rank-{env.rank:05d}.log")
    try:
        device = distributed.init(env, config.cluster.gpus_per_node)
    except RunError as err:  # no GPU where the profile asks for them; before any collective, each rank stops alone
        log.error("%s", err)
        AttemptRecorder(run_dir, env.job_id, env.restart_count, enabled=env.is_main).ended("failed", 0, error=failure(err))
        raise
    try:
        with run_lock(run_dir, env, device):  # one job per run directory, from before the resume to the end
            return _fit(config, env, device)
    finally:
        distributed.shutdown()


def _fit(config: Config, env: DistEnv, device: torch.device) -> dict:
    trainer = None
    try:
        trainer = Trainer(config, env, device)
        return trainer.fit()
    except Exception as err:
        if trainer is not None:  # for the coordinator: where and why it failed
            trainer.record.ended("failed", trainer.step, error=failure(err))
        raise


def failure(err: Exception) -> str:
    """An error as the ledger keeps it, for the coordinator and `status`."""
    return f"{type(err).__name__}: {err}"[:2000]
