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
from dodo.distributed.engine import (create_engine, device_for, has_moe_parameters, init_distributed,
                                     resolve_precision)
from dodo.exitcodes import EXIT_COMPLETED, EXIT_STOPPED  # noqa: F401 (re-exported)
from dodo.rundir import RunDir
from dodo.tasks import build_task
from dodo.train import checkpoint
from dodo.train.metrics import MetricsWriter, Progress
from dodo.train.signals import StopFlag
from dodo.train.summary import write_summary
from dodo.train.init_from import read_init

log = logging.getLogger("dodo.train")


class Trainer:
    def __init__(self, cfg: JobConfig, run: RunDir, env: DistEnv):
        self.cfg, self.run, self.env = cfg, run, env
        self.rank, self.world = env.rank, env.world_size
        self.stop = StopFlag().install()
        torch.set_num_threads(cfg.cluster.threads_per_task)
        init_distributed(env)
        self.device = device_for(env)
        self.precision = resolve_precision(cfg.train.precision, self.device)

        torch.manual_seed(cfg.model.init_seed)  # frozen random-init weights: identical on every rank
        self.task = build_task(cfg, read_init(cfg))  # tensors from other runs, read before the model
        model = self.task.model.to(self.device)
        self.trainable, self.total_params = count_parameters(model)
        ckpt, universal = checkpoint.latest(run), None
        if ckpt is not None and ckpt.world_size != self.world and not has_moe_parameters(model.parameters()):
            universal = checkpoint.prepare_universal(run, ckpt)  # MoE: checkpoint.load refuses
        self.engine, self.scheduler = create_engine(model, cfg, env, self.precision,
                                                    load_universal=universal is not None)
        self.global_batch = cfg.train.micro_batch * cfg.train.grad_accum * self.world

        self.step = 0
        self.history: dict[str, Any] = {}
        if ckpt is not None:
            state = checkpoint.load(self.engine, ckpt, universal, seed=cfg.train.seed)
            self.step, self.history = state["step"], state.get("history", {})
            self._sampler(self.step).check_resumable(state["sampler"])
            log.info("resumed from %s at step %d%s", ckpt.path, self.step,
                     f" (written by {ckpt.world_size} ranks, now {self.world}: via {universal})" if universal else "")
        else:
            torch.manual_seed(cfg.train.seed * 1000 + self.rank)  # dropout streams differ per rank

    def _sampler(self, start_step: int) -> GlobalBatchSampler:
        return GlobalBatchSampler(len(self.task.train_set), self.global_batch, self.rank, self.world,
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
        return self.task.evaluate(self.engine.module, 2 * self.cfg.train.micro_batch, self.rank, self.world)

    def _save(self) -> None:
        state = {"step": self.step, "sampler": self._sampler(self.step).state_dict(self.step),
                 "history": self.history, "dodo_version": __version__}
        info = checkpoint.save(self.engine, self.run, self.step, state, self.cfg.train.keep_checkpoints)
        if self.rank == 0:
            log.info("checkpoint %s", info.path)

    def fit(self) -> int:
        cfg, t = self.cfg, self.cfg.train
        writer = None
        if self.rank == 0:
            writer = MetricsWriter(self.run.metrics, self.run.tensorboard, self.step)
            self.run.update_status(state="running", step=self.step, total_steps=t.steps, world_size=self.world)
            print(f"dodo: {cfg.name}: {self.world} ranks, {self.precision}, ZeRO-{cfg.deepspeed.zero_stage}, "
                  f"{self.trainable:,} trainable of {self.total_params:,} parameters", flush=True)
        if "initial_eval" not in self.history:
            self.history["initial_eval"] = self._evaluate()
            if writer:
                writer.write(0, **self.history["initial_eval"])
        progress = Progress(t.steps, self.step, self.global_batch)
        window, window_steps, started, first_step = 0.0, 0, time.perf_counter(), self.step
        self.engine.train()
        for batch in self._loader():
            loss = self._train_step(batch)
            self.step += 1
            window, window_steps = window + loss, window_steps + 1
            if self.step % t.log_every == 0 or self.step == t.steps:
                mean_loss = self._all_mean(window / window_steps)
                step_metrics = self._step_metrics()
                lr = self.scheduler.get_last_lr()[0]
                if writer:
                    writer.write(self.step, **{"train.loss": mean_loss, "train.lr": lr}, **step_metrics)
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

    def _train_step(self, batch: dict[str, Any]) -> float:
        """One optimizer step over this rank's share of the global batch; returns its mean loss."""
        tensors = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        rows = next(iter(tensors.values())).shape[0]
        mb, losses = self.cfg.train.micro_batch, []
        for lo in range(0, rows, mb):
            loss = self.engine(**self._to_device({k: v[lo:lo + mb] for k, v in tensors.items()}))
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.item())
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
            writer.close()
        return EXIT_STOPPED

    def _finish(self, writer: MetricsWriter | None, train_seconds: float) -> None:
        final_eval = self._evaluate()
        with self._rank0_may_run_alone():
            if writer is not None:
                extra, report = self.task.final_report(self.engine.module)
                writer.write(self.step, **final_eval, **extra)
                writer.close()
                write_summary(self.run, self.cfg, self.history["initial_eval"], {**final_eval, **extra}, report,
                              train_seconds, self.world, self.trainable, self.total_params)
                self.run.update_status(state="completed", step=self.step)
        dist.barrier()

    def _rank0_may_run_alone(self) -> contextlib.AbstractContextManager:
        """Collective on entry. Expert parallelism: every rank first hands rank 0 (and itself) a
        copy of all experts, so rank 0's final report needs no all-to-all with the others."""
        if getattr(self.engine.module, "moe", None) is None:
            return contextlib.nullcontext()
        from dodo.moe.layer import replicated_experts
        return replicated_experts(self.engine.module)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
