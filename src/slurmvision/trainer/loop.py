"""The training loop every rank runs: `Trainer.fit` is the whole loop, `train_step` one step of it.
The Trainer's pieces are built by `trainer.build`; `trainer.entry.train` runs it in a rank's process."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch

from slurmvision.configs import Config, config_hash, to_dict
from slurmvision.errors import DataError, RunError
from slurmvision.shards.synthetic import class_names
from slurmvision.shards.transforms import DeviceAugment
from slurmvision.slurm.causes import Outcome, StopReason
from slurmvision.trainer.async_checkpoint import AsyncCheckpointManager
from slurmvision.trainer.audit import Audit
from slurmvision.trainer.build import build_data, build_models, empty_model, persistent_buffers, start_record
from slurmvision.trainer.checkpoint import params_sha256, rng_state, weights_facts
from slurmvision.trainer.deadline import StepTimes, TimeLimit, stop_deadline, warn_if_stop_was_tight
from slurmvision.trainer.distributed import DistEnv, agree
from slurmvision.trainer.eval_report import EvalReport
from slurmvision.trainer.evaluation import evaluate
from slurmvision.trainer.monitor import DataWait, Monitor
from slurmvision.trainer.resume import Restored, resume
from slurmvision.trainer.schedule import build_schedule
from slurmvision.trainer.signals import StopRequest, reported_signal
from slurmvision.trainer.step import Boundary, MidStep, StepResult, StepTotals, Stop, distill_loss, loss_fn

log = logging.getLogger("slurmvision.trainer")


class Trainer:
    def __init__(self, config: Config, env: DistEnv, device: torch.device):
        self.config, self.env, self.device = config, env, device
        # First: a signal while the model builds and the checkpoint loads is kept for the first step
        # boundary, not left to the default action (USR1 kills) or to submitit's handler.
        self.signals = StopRequest().install()
        self.run_dir = Path(config.run.dir)
        self.classes = class_names(config.data)  # kept in each checkpoint's meta, for `eval --data`
        self.num_classes = config.model.num_classes or len(self.classes)
        # An elastic run on fewer ranks than planned accumulates more: the global batch stays.
        self.grad_accum = config.grad_accum_at(env.world_size)
        self.global_batch = config.data.batch_size * env.world_size * self.grad_accum
        self.model, self.engine, self.teacher, self.ema = build_models(
            config, self.num_classes, device, env.local_rank, self.grad_accum
        )
        self.checkpoints = AsyncCheckpointManager(
            self.run_dir / "checkpoints", env, config.trainer.keep_checkpoints, device, describe=weights_facts
        )
        self._start_from(resume(self.checkpoints, self.engine, self.ema, config, env.rank, self.global_batch))

    def _start_from(self, restored: Restored) -> None:
        """The training state, and what is built on the state the resume restored: the data position,
        and the schedule, which writes to the optimizer's param groups that loading replaced."""
        config, env, trainer = self.config, self.env, self.config.trainer
        self.step, self.samples_seen, self.bad_steps = restored.step, restored.samples_seen, 0
        # The step whose state is on disk (saved or resumed from): a stop then saves nothing.
        self.saved_step = restored.step if restored.checkpoint else None
        self.saving: Optional[int] = None  # the step of a background save (trainer.async_checkpoint) not committed yet
        self.times = StepTimes(save_s=restored.save_s, eval_s=restored.eval_s)
        self.audit = Audit(self.run_dir, env.rank, config.data.audit)
        self.audit.trim(restored.step)  # what an attempt killed after the checkpoint recorded is redone
        self.reader, self.batches = build_data(config, env, self.device, self.num_classes, restored.loader)
        self.schedule_at = build_schedule(
            self.engine.optimizer, config, self.global_batch, self.reader.samples_per_epoch
        )
        self.augment = DeviceAugment(config.data, self.num_classes, self.device, trainer.seed, env.rank)
        self.monitor = Monitor(
            self.run_dir, env, restored.step, trainer.max_steps, to_dict(config), config.run.share_with_group
        )
        self.eval_report = EvalReport(
            config, env, self.device, self.run_dir, self.monitor, self.classes, self.augment.normalize
        )
        self.data_wait = DataWait(config.data.workers, self.device, env.world_size)
        stop_before_limit = env.is_main and config.cluster.executor == "slurm" and config.cluster.stop_before_limit
        self.time_limit = TimeLimit(env.job_id if stop_before_limit else None, self.signals)
        self.persistent_buffers = persistent_buffers(self.model)
        self.record = start_record(self.run_dir, env, config, restored, self.grad_accum, self.global_batch)
        self.saved_at = time.monotonic()  # trainer.checkpoint_every_minutes count from here

    def fit(self) -> dict:
        """Steps up to trainer.max_steps, saving and evaluating on the way; a stop agreed at any step ends it."""
        batches = self.batches
        try:
            while self.step < self.config.trainer.max_steps:
                result = self.train_step(batches)
                if result.stop is not None:
                    return self.stop(result.stop)
                if result.applied and not result.stop_pending:
                    self.maybe_save(result.save_due)
                    self.maybe_evaluate()
            return self.finish()
        finally:
            # Shut the loader workers down by the loader's own protocol on any way out: they
            # ignore SIGTERM (see shards.reader), so multiprocessing's exit-time terminate()
            # would wait for them forever.
            batches.close()

    def train_step(self, batches) -> StepResult:
        """One optimizer step over `grad_accum` micro-batches, once every rank has agreed to take it."""
        started = time.monotonic()
        position = self.batches.position()  # before this step's batches: what a stop in this step saves
        step_batches, error = [], None
        try:
            # A rank with a stop pending fetches nothing: its flag alone stops every rank at the boundary.
            for _ in range(0 if self.signals.requested else self.grad_accum):
                step_batches.append(next(batches))
        except DataError as err:
            error = err
        data_wait = time.monotonic() - started  # this rank's own wait, before the agreement's wait for the others
        boundary = self._agree_at_boundary(error)
        reason = boundary.stop_reason(self.config.cluster.signal)
        if reason is not None:
            return StepResult(stop=Stop(reason, position))
        totals = self._forward_backward(step_batches, position)
        if isinstance(totals, Stop):
            return StepResult(stop=totals)
        lr, weight_decay = self.schedule_at(self.step)
        if totals.nonfinite:
            self._skip_step(int(totals.nonfinite))
            return StepResult()
        self.bad_steps = 0
        grad_norm = self.engine.step()
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)
        self.step += 1
        self.samples_seen += int(totals.images)
        elapsed = time.monotonic() - started
        self.times.steps.append(elapsed)
        self.data_wait.add(data_wait, elapsed)
        self.record.progress(self.step, elapsed)
        if self.step % self.config.trainer.log_every == 0 or self.step == self.config.trainer.max_steps:
            self._log_step(
                totals,
                elapsed,
                {
                    "train/lr": lr,
                    "train/weight_decay": weight_decay,
                    "train/data_wait_s": data_wait,
                    "train/data_wait_share": self.data_wait.share(),
                    "train/grad_norm": grad_norm,
                    "train/resolution": step_batches[-1].resolution,
                },
            )
        return StepResult(applied=True, save_due=bool(boundary.save_due), stop_pending=bool(totals.stop_pending))

    def maybe_save(self, due: bool) -> None:
        self.settle_save()
        if self.step % self.config.trainer.checkpoint_every == 0 or due:
            self.save(background=self.config.trainer.async_checkpoint)

    def maybe_evaluate(self) -> None:
        every = self.config.trainer.eval_every
        if every and self.step % every == 0 and self.step < self.config.trainer.max_steps:
            self.evaluate()

    def finish(self) -> dict:
        """The end of the run: the last step saved, the final evaluation, the attempt recorded as finished."""
        self.settle_save(wait=True)
        if self.saved_step != self.step:
            self.save()
        results = self.evaluate()
        self.monitor.final(self.step, results)
        self.monitor.close()
        self.checkpoints.wait_pruned()  # the run's directory as it stays: only the kept checkpoints
        self.record.ended(Outcome.FINISHED, self.step)
        return results

    def stop(self, stop: Stop) -> dict:
        """Save the agreed state on every rank and report; the caller (Slurm job, local run) requeues or exits.

        Every rank reports the same reason: a time-limit warning if any rank got one.
        """
        if stop.reason == StopReason.LIMIT_AHEAD:
            log.warning(
                "the time limit is near: one more step and a save (about %.0fs) would not fit; stopping at step %d",
                self.times.next_step_and_save(self._evaluates_next()),
                self.step,
            )
        started = time.monotonic()
        self.settle_save(wait=True)  # a background save is committed first: the final one comes after it
        on_disk = self.saved_step == self.step  # saved by the last boundary, or resumed from: the same state
        if not on_disk:
            self.save(stop.position, stop.rng)
        waited = started - self.signals.received_at if self.signals.received_at else 0.0
        took = waited + time.monotonic() - started
        log.warning(
            "stopped by %s (this rank: %s) at step %d: checkpoint saved %.1fs after the signal%s",
            stop.reason,
            self.signals.name,
            self.step,
            took,
            " (it was on disk already)" if on_disk else "",
        )
        warn_if_stop_was_tight(stop.reason, took, self.config.cluster)
        self.monitor.close()
        self.checkpoints.wait_pruned()  # after the save is reported: a stop's deadline is the save's
        self.record.ended(Outcome.STOPPED, self.step, signal=stop.reason)
        return {"interrupted": True, "signal": stop.reason, "step": self.step}

    def _evaluates_next(self) -> bool:
        every = self.config.trainer.eval_every
        return bool(every) and (self.step + 1) % every == 0

    def _agree_at_boundary(self, error: Optional[DataError]) -> Boundary:
        """Every rank's data error, timed save and stop signals, summed; a data error on any rank stops all."""
        minutes = self.config.trainer.checkpoint_every_minutes
        save_due = bool(minutes) and time.monotonic() - self.saved_at > minutes * 60 and self.env.is_main
        boundary = agree(
            Boundary,
            self.device,
            data_errors=error is not None,
            save_due=save_due,
            warnings=self.signals.is_warning,
            terms=self.signals.requested and not self.signals.is_warning,
            limit_ahead=self.time_limit.too_close(self.times, self._evaluates_next()),
        )
        if boundary.data_errors:
            raise error or DataError("another rank stopped on bad data; see its log for the samples")
        return boundary

    def _forward_backward(self, step_batches: list, position: dict) -> StepTotals | Stop:
        """The step's micro-steps, then their totals over all ranks; or, if the step cannot finish
        before a signal's deadline, the stop that saves the state from its start."""
        loss_sum, last = 0.0, len(step_batches) - 1
        # The last safe point, should the step have to be cut short: the state at its start.
        start_rng = rng_state() if last > 0 else None
        start_buffers = [b.clone() for b in self.persistent_buffers] if last > 0 else []
        for i, batch in enumerate(step_batches):
            micro_started = time.monotonic()
            loss_sum += self._micro_step(batch, i, sync=i == last)
            self.times.micro.append(time.monotonic() - micro_started)
            reason = self._cut_short(last - i) if i < last else None
            if reason is not None:
                for buffer, saved in zip(self.persistent_buffers, start_buffers):
                    buffer.copy_(saved)
                log.warning(
                    "step %d cannot finish before the %s deadline: saving the state from its start instead "
                    "(the %d micro-batch(es) done are redone after the restart)",
                    self.step + 1,
                    reason,
                    i + 1,
                )
                return Stop(reason, position, start_rng)
        self.audit.write(self.step, step_batches)
        return agree(
            StepTotals,
            self.device,
            loss=loss_sum,
            nonfinite=not math.isfinite(loss_sum),
            images=sum(len(b.keys) for b in step_batches),
            bad_samples=sum(len(b.bad) for b in step_batches),
            stop_pending=self.signals.requested,
        )

    def _cut_short(self, micro_left: int) -> Optional[StopReason]:
        """Between micro-steps: the agreed reason to stop if some rank would miss its deadline by finishing the step."""
        deadline = stop_deadline(self.signals, self.config.cluster)
        late = deadline is not None and time.monotonic() + self.times.to_finish(micro_left) > deadline
        mid = agree(MidStep, self.device, warnings=self.signals.is_warning, late=late)
        return reported_signal(mid.warnings, self.config.cluster.signal) if mid.late else None

    def _skip_step(self, ranks: int) -> None:
        self.engine.skip()
        self.saved_step = self.saving = None  # its batches are consumed: the data position on disk is behind
        self.bad_steps += 1
        log.warning(
            "non-finite loss at step %d on %d rank(s): step skipped (%d in a row)", self.step, ranks, self.bad_steps
        )
        if self.bad_steps >= self.config.trainer.nonfinite_budget:
            raise RunError(
                f"{self.bad_steps} non-finite steps in a row at step {self.step}: stopped; the last good "
                f"checkpoint is kept. Lower optim.lr, set optim.clip_grad, or use trainer.precision=bf16"
            )

    def _log_step(self, totals: StepTotals, elapsed: float, scalars: dict) -> None:
        loss = totals.loss / self.env.world_size / self.grad_accum
        self.monitor.scalars(
            self.step,
            {
                "train/loss": loss,
                **scalars,
                "train/images_per_s": totals.images / elapsed,
                "train/step_time_s": elapsed,
                "train/loss_scale": self.engine.loss_scale,
                "train/bad_samples": totals.bad_samples,
                "train/gpu_mem_gib": self.monitor.memory(self.device),
            },
        )
        self.monitor.progress(self.step, loss, totals.images / elapsed, scalars.get("train/data_wait_share"))

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
                soft = distill_loss(logits, teacher_logits, distill.temperature)
                loss = (1 - distill.weight) * loss + distill.weight * soft
            if empty:
                loss = loss * 0.0
        self.engine.backward(loss / self.grad_accum)
        return float(loss.detach())

    def save(self, position: Optional[dict] = None, rng: Optional[dict] = None, background: bool = False) -> None:
        """Collective checkpoint; `position` and `rng` are the data position and RNG states if not the current ones.
        In the `background`, training waits only for the copy of the state to host memory (settle_save commits it)."""
        self.settle_save(wait=True)  # one background save at a time
        started = time.monotonic()
        shared = {
            "engine": self.engine.state_dict(),
            "step": self.step,
            "samples_seen": self.samples_seen,
            "loader": position or self.batches.position(),
            "global_batch": self.global_batch,
            "config": json.dumps(to_dict(self.config)),
        }
        if self.ema is not None:
            shared["ema"] = self.ema.module.state_dict()
        meta = {
            "step": self.step,
            "epoch": shared["loader"]["epoch"],
            "samples_seen": self.samples_seen,
            "world_size": self.env.world_size,
            "engine": self.config.trainer.engine,
            "config_hash": config_hash(self.config),
            "time": time.time(),  # and params_sha256 (weights_facts), from the state as it is written
            "last_save_s": self.times.save_s,
            "last_eval_s": self.times.eval_s,
            "classes": self.classes,
        }
        if background:
            self.checkpoints.save_async(self.step, shared, {"rng": rng or rng_state()}, meta)
            self.saving, self.saved_at = self.step, time.monotonic()
            log.info(
                "checkpoint of step %d copied in %.2fs, written in the background", self.step, self.saved_at - started
            )
            return
        path = self.checkpoints.save(self.step, shared, {"rng": rng or rng_state()}, meta)
        self.saved_step, self.saved_at = self.step, time.monotonic()
        self.record.progress(self.step, saved=self.step)
        self.times.save_s = time.monotonic() - started
        log.info("checkpoint %s saved in %.1fs", path.name, self.times.save_s)

    def settle_save(self, wait: bool = False) -> None:
        """The background save committed once every rank has written it (a collective while one is pending);
        a failed one is logged on every rank (CheckpointManager.settle) and noted in the ledger."""
        if wait and self.checkpoints.pending is not None:
            log.info("waiting for the background save of step %d", self.checkpoints.pending)
        settled = self.checkpoints.settle(wait)
        if settled is None:
            return
        if settled.error:
            self.record.note(settled.error)
            return
        if settled.step == self.saving:  # no step skipped since: the state on disk is the current one or older
            self.saved_step = settled.step
        self.record.progress(self.step, saved=settled.step)
        self.times.save_s = settled.seconds  # as long as a synchronous save: what a stop plans with
        log.info("checkpoint %s saved in %.1fs in the background", settled.path.name, settled.seconds)

    def evaluate(self) -> dict:
        if self.config.data.synthetic:  # random images and labels: nothing to measure
            return {"step": self.step, "evaluated": False}
        started = time.monotonic()
        # The trained weights, whole on this rank (a sharded engine gathers them into an empty copy).
        live = self.engine.eval_module(lambda: empty_model(self.config.model, self.num_classes))
        model = self.ema.module if self.ema is not None else live
        results = evaluate(model, self.config, self.env, self.device, self.num_classes)
        self.times.eval_s = time.monotonic() - started
        results.update(step=self.step, params_sha256=params_sha256(live.state_dict()))
        self.eval_report(self.step, results, model)
        return results
