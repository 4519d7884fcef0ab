"""The training loop of one rank: build, resume, train, evaluate, checkpoint, summarise."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import torch
import torch.distributed as dist

from dodo import __version__
from dodo.adapters.inject import count_parameters
from dodo.cluster.env import DistEnv
from dodo.config.schema import JobConfig
from dodo.data.sampler import GlobalBatchSampler
from dodo.distributed.engine import create_engine, device_for, init_distributed, resolve_precision
from dodo.exitcodes import EXIT_COMPLETED, EXIT_DIVERGED, EXIT_STOPPED  # noqa: F401 (re-exported)
from dodo.rundir import RunDir
from dodo.tasks import build_task
from dodo.train import checkpoint, provenance
from dodo.train.guard import NonFiniteGuard, injected_nan, params_nonfinite, skip_update
from dodo.train.heartbeat import Heartbeat
from dodo.train.init_from import read_init
from dodo.train.metrics import MetricsWriter, Progress
from dodo.train.signals import StopFlag
from dodo.train.summary import write_summary

log = logging.getLogger("dodo.train")
SAVE_MARGIN = 1.5  # a save must fit in cluster.signal_lead_s this many times over (with one step)


class Diverged(RuntimeError):
    """A non-finite loss, gradient or trainable tensor that the divergence guard stops on."""


class Trainer:
    def __init__(self, cfg: JobConfig, run: RunDir, env: DistEnv):
        self.cfg, self.run, self.env = cfg, run, env
        self.rank, self.world = env.rank, env.world_size
        self.stop = StopFlag().install()
        hang = cfg.cluster.hang_timeout_s
        self.heartbeat = Heartbeat(run, self.rank, interval=max(0.2, min(5.0, hang.step / 5)))
        self.heartbeat.beat("startup", 0, force=True)
        torch.set_num_threads(cfg.cluster.threads_per_task)
        # A collective that waits longer than any phase may take has lost a rank: raise rather
        # than wait for gloo's 30 min / NCCL's 10 min default (the watchdog usually acts first).
        init_distributed(env, timeout_s=max(hang.step, hang.eval, hang.checkpoint) + 60)
        log.info("startup: process group %.3f", time.time())  # stages: bench/startup.py
        self.device = device_for(env)
        self.precision = resolve_precision(cfg.train.precision, self.device)

        torch.manual_seed(cfg.model.init_seed)  # frozen random-init weights: identical on every rank
        self.task = build_task(cfg, read_init(cfg))  # tensors from other runs, read before the model
        log.info("startup: model and data %.3f", time.time())
        model = self.task.model.to(self.device)
        self.trainable, self.total_params = count_parameters(model)
        if self.rank == 0:  # WiSE-FT's theta_0 (dodo/eval/wise.py): the fresh model, once; resumes keep it
            from dodo.eval.wise import save_pretrained_state
            save_pretrained_state(run.path, model)
        ckpt = checkpoint.latest(run)
        # Another world size (MoE: or ep_size): a universal (dense) or resharded (MoE) copy to load.
        universal = checkpoint.prepare_resume(run, ckpt, model, cfg.model.moe.ep_size)
        self.engine, self.scheduler = create_engine(model, cfg, env, self.precision,
                                                    load_universal=checkpoint.is_universal(universal))
        log.info("startup: deepspeed engine %.3f", time.time())
        self.global_batch = cfg.train.micro_batch * cfg.train.grad_accum * self.world

        self.step = 0
        self.history: dict[str, Any] = {}
        self.guard = NonFiniteGuard(cfg.train.on_nonfinite, cfg.train.max_nonfinite_skips,
                                    fp16=self.precision == "fp16", device=self.device)
        self.step_seconds = 0.0  # mean wall time of a step in this allocation, for the save budget
        if ckpt is not None:
            state = checkpoint.load(self.engine, ckpt, universal, seed=cfg.train.seed)
            self.step, self.history = state["step"], state.get("history", {})
            if "task" in state:  # the task's own state (the hard-sample bank), before the sampler reads it
                self.task.load_state_dict(state["task"])
            self._sampler(self.step).check_resumable(state["sampler"])
            log.info("resumed from %s at step %d%s", ckpt.path, self.step,
                     f" (written by {ckpt.world_size} ranks, now {self.world}: via {universal})" if universal else "")
        else:
            torch.manual_seed(cfg.train.seed * 1000 + self.rank)  # dropout streams differ per rank
        log.info("startup: checkpoint %.3f", time.time())

    def _sampler(self, start_step: int) -> GlobalBatchSampler:
        # A task may order its data itself (hard-sample weighting: dodo/data/hard_sampler.py).
        make = getattr(self.task, "batch_sampler", GlobalBatchSampler)
        return make(len(self.task.train_set), self.global_batch, self.rank, self.world,
                    seed=self.cfg.data.seed, start_step=start_step,
                    max_steps=self.cfg.train.steps, block=self.cfg.data.shuffle_block,
                    window=self.cfg.data.shuffle_window)

    def _loader(self) -> torch.utils.data.DataLoader:
        # A private generator: the DataLoader draws its worker base seed from it, not from the
        # global RNG, whose stream must be the same in a straight run and a resumed one.
        # Batches carry uint8 images (and the cache's token ids where it stores them); the
        # device converts and normalises them (dodo/data/device.py, docs/benchmarks.md).
        from dodo.data.collate import for_training
        from dodo.data.device import DeviceBatch, loader_options

        d = self.cfg.data
        self._to_device = DeviceBatch.for_collate(self.task.collate, self.device)
        return torch.utils.data.DataLoader(
            self.task.train_set, batch_sampler=self._sampler(self.step),
            collate_fn=for_training(self.task.collate, self.task.train_set), num_workers=d.num_workers,
            generator=torch.Generator().manual_seed(self.cfg.data.seed + self.step),
            **loader_options(self.device, d.num_workers, d.prefetch_factor))

    def _evaluate(self) -> dict[str, float]:
        self.heartbeat.beat("eval", self.step, force=True)
        metrics = self.task.evaluate(self.engine.module, 2 * self.cfg.train.micro_batch, self.rank, self.world)
        self.heartbeat.beat("step", self.step, force=True)
        return metrics

    def _save(self) -> None:
        # Never publish a checkpoint a resume would carry the divergence from (collective).
        if params_nonfinite((p for p in self.engine.module.parameters() if p.requires_grad), self.device):
            raise Diverged(f"non-finite trainable weights at step {self.step}")
        self.heartbeat.beat("checkpoint", self.step, force=True)
        state = {"step": self.step, "sampler": self._sampler(self.step).state_dict(self.step),
                 "history": self.history, "dodo_version": __version__}
        if hasattr(self.task, "state_dict"):  # e.g. the hard-sample bank (identical on every rank)
            state["task"] = self.task.state_dict()
        started = time.perf_counter()
        info = checkpoint.save(self.engine, self.run, self.step, state, self.cfg.train.keep_checkpoints)
        seconds = time.perf_counter() - started
        self.heartbeat.beat("step", self.step, force=True)
        if self.rank == 0:
            log.info("checkpoint %s (%.2f s)", info.path, seconds)
            self._save_budget(seconds)

    def _save_budget(self, seconds: float) -> None:
        """Warn when the last save, with a margin, and one step would not fit in the warning lead."""
        lead = self.cfg.cluster.signal_lead_s
        needed = SAVE_MARGIN * seconds + self.step_seconds
        fields: dict[str, Any] = {"save_seconds": round(seconds, 3), "save_warning": None}
        if needed > lead:
            advice = max(lead + 1, int(needed + 0.999) + 10)
            fields["save_warning"] = (
                f"checkpoint save took {seconds:.1f} s; x{SAVE_MARGIN} plus one step ({self.step_seconds:.1f} s) "
                f"is {needed:.0f} s, more than cluster.signal_lead_s={lead}: a checkpoint may not finish "
                f"before the time limit; set cluster.signal_lead_s={advice}")
            log.warning(fields["save_warning"])
            print(f"dodo: warning: {fields['save_warning']}", flush=True)
        self.run.update_status(**fields)

    def fit(self) -> int:
        cfg, t = self.cfg, self.cfg.train
        writer = None
        if self.rank == 0:
            writer = MetricsWriter(self.run, self.step, t.trackers, cfg.name,
                                   {"world_size": self.world, "zero_stage": cfg.deepspeed.zero_stage,
                                    "lr": t.lr, "steps": t.steps, "global_batch": self.global_batch,
                                    "trainable_parameters": self.trainable})
            self.run.update_status(state="running", step=self.step, total_steps=t.steps, world_size=self.world)
            provenance.begin_segment(self.run, self.step, self.world)
            print(f"dodo: {cfg.name}: {self.world} ranks, {self.precision}, ZeRO-{cfg.deepspeed.zero_stage}, "
                  f"{self.trainable:,} trainable of {self.total_params:,} parameters", flush=True)
        if "initial_eval" not in self.history:
            self.history["initial_eval"] = self._evaluate()
            if writer:
                writer.write(0, **self.history["initial_eval"])
        progress = Progress(t.steps, self.step, self.global_batch)
        window, window_steps, started, first_step = 0.0, 0, time.perf_counter(), self.step
        self.engine.train()
        try:
            return self._train(writer, progress, window, window_steps, started, first_step)
        except Diverged as err:
            return self._diverged(writer, progress, str(err))

    def _train(self, writer, progress, window, window_steps, started, first_step) -> int:
        cfg, t = self.cfg, self.cfg.train
        self.heartbeat.beat("step", self.step, force=True)
        for batch in self._loader():
            tick = time.perf_counter()
            loss = self._train_step(batch)
            if self.step == first_step:
                log.info("startup: first step %.3f", time.time())
            self.step += 1
            self.heartbeat.beat("step", self.step)
            done = self.step - first_step
            self.step_seconds += (time.perf_counter() - tick - self.step_seconds) / done
            if loss is None:  # skipped by the divergence guard (the same step on every rank)
                if writer:
                    print(f"dodo: warning: {self.guard.reason}: update skipped ({self.guard.consecutive} in a row, "
                          f"train.max_nonfinite_skips={t.max_nonfinite_skips})", flush=True)
                    self.run.update_status(skipped_steps=len(self.guard.skipped))
            else:
                window, window_steps = window + loss, window_steps + 1
            if (self.step % t.log_every == 0 or self.step == t.steps) and window_steps:
                mean_loss = self._all_mean(window / window_steps)
                step_metrics = self._step_metrics()
                lr = self.scheduler.get_last_lr()[0]
                if writer:
                    writer.write(self.step, **{"train.loss": mean_loss, "train.lr": lr,
                                               "train.skipped_steps": len(self.guard.skipped)}, **step_metrics)
                    progress.update(self.step, mean_loss, lr)
                    self.run.update_status(step=self.step, last_loss=mean_loss)
                window, window_steps = 0.0, 0
            if self.step % t.eval_every == 0 and self.step < t.steps:
                metrics = self._evaluate()
                if writer:
                    writer.write(self.step, **metrics)
            if self.step % t.save_every == 0 or self.step == t.steps:
                self._save()
            if t.steps_per_allocation and self.step - first_step >= t.steps_per_allocation:
                self.stop.reason = self.stop.reason or f"train.steps_per_allocation={t.steps_per_allocation} reached"
            if self.step < t.steps and self.stop.agreed():
                return self._stopped(writer, progress)
        if writer:
            progress.close()
        self._finish(writer, time.perf_counter() - started)
        return EXIT_COMPLETED

    def _train_step(self, batch: dict[str, Any]) -> float | None:
        """One optimizer step over this rank's share of the global batch; returns its mean loss,
        or None when the divergence guard skipped the update (train.on_nonfinite=skip)."""
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        rows = next(iter(tensors.values())).shape[0]
        mb, losses = self.cfg.train.micro_batch, []
        starts = list(range(0, rows, mb))
        for lo in starts:
            loss = self.engine(**self._to_device({k: v[lo:lo + mb] for k, v in tensors.items()}))
            if injected_nan(self.step + 1, self.rank):  # test hook, see dodo/train/guard.py
                loss = loss * float("nan")
            self.engine.backward(loss)
            losses.append(loss.item())
            if lo != starts[-1]:
                self.engine.step()  # inside the accumulation: DeepSpeed does not update yet
        # The boundary: gradients are reduced, not yet applied. One all-reduce decides for all.
        verdict = self.guard.check(self.engine, losses, self.step + 1)
        if verdict == "stop":
            raise Diverged(self.guard.reason)
        if verdict == "skip":
            skip_update(self.engine)
            return None
        self.engine.step()
        return sum(losses) / len(losses)

    def _step_metrics(self) -> dict[str, Any]:
        """The model's own per-step metrics (MoE: expert load, dropped tokens, router entropy,
        aux losses) since the last log line; collective, so every rank calls it."""
        hook = getattr(self.engine.module, "step_metrics", None)
        return hook() if hook is not None else {}

    def _all_mean(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.world

    def _stopped(self, writer: MetricsWriter | None, progress: Progress) -> int:
        if self.step % self.cfg.train.save_every:
            self._save()
        if writer:
            progress.close()
            print(f"dodo: stopped at step {self.step}/{self.cfg.train.steps} ({self.stop.reason}) after a "
                  f"checkpoint; a cluster job requeues itself (up to cluster.max_requeues), and "
                  f"`dodo submit {self.run.path}` resumes it by hand", flush=True)
            self.run.update_status(state="stopped", step=self.step, reason=self.stop.reason)
            provenance.end_segment(self.run, self.step, f"stopped: {self.stop.reason}")
            writer.close("stopped")
        return EXIT_STOPPED

    def _diverged(self, writer: MetricsWriter | None, progress: Progress, reason: str) -> int:
        """Stop without an update or a checkpoint; name the step and the last good checkpoint."""
        last = checkpoint.latest(self.run)
        good = f"last good checkpoint {last.path} (step {last.step})" if last else "no checkpoint was published"
        if writer:
            progress.close()
            print(f"dodo: error: training diverged: {reason} (train.on_nonfinite={self.cfg.train.on_nonfinite}); "
                  f"stopped without applying it or saving; {good}", flush=True)
            self.run.update_status(state="failed", step=self.step, reason=f"diverged: {reason}",
                                   last_good_checkpoint=str(last.path) if last else None,
                                   exit_code=EXIT_DIVERGED)
            provenance.end_segment(self.run, self.step, f"failed: diverged: {reason}")
            writer.close("failed")
        return EXIT_DIVERGED

    def _finish(self, writer: MetricsWriter | None, train_seconds: float) -> None:
        final_eval = self._evaluate()
        self.heartbeat.beat("eval", self.step, force=True)  # rank 0's final report: the others wait
        with self._rank0_may_run_alone():
            if writer is not None:
                extra, report = self.task.final_report(self.engine.module)
                suites, suite_lines = self.task.suite_report(self.engine.module)
                extra, report = {**extra, **suites}, report + (["eval suites:"] + suite_lines if suites else [])
                if getattr(self.cfg.eval, "weightwatcher", False):  # per-layer alphas: <run>/weightwatcher_layers.json
                    from dodo.eval.weightwatch import report as weightwatcher
                    ww_metrics, ww_lines = weightwatcher(self.engine.module, self.run.path)
                    extra, report = {**extra, **ww_metrics}, report + ww_lines
                writer.write(self.step, **final_eval, **extra)
                write_summary(self.run, self.cfg, self.history["initial_eval"], {**final_eval, **extra}, report,
                              train_seconds, self.world, self.trainable, self.total_params)
                writer.close("completed")
                self.run.update_status(state="completed", step=self.step)
                provenance.end_segment(self.run, self.step, "completed")
        dist.barrier()

    def _rank0_may_run_alone(self) -> contextlib.AbstractContextManager:
        """Collective on entry. Expert parallelism: every rank first hands rank 0 (and itself) a
        copy of all experts, so rank 0's final report needs no all-to-all with the others."""
        if getattr(self.engine.module, "moe", None) is None:
            return contextlib.nullcontext()
        from dodo.moe.layer import replicated_experts
        return replicated_experts(self.engine.module)

    def close(self) -> None:
        self.heartbeat.close()
        if dist.is_initialized():
            dist.destroy_process_group()
