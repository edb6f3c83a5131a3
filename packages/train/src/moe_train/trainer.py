"""The training loop: AdamW, warmup + decay, clipping, accumulation, mixed precision, DDP, expert
parallelism, XL memory.

Checkpoints hold everything a resumed run needs to continue bit-for-bit: model, optimiser,
scheduler and grad-scaler states, each rank's data position, RNG states and Transformer-XL memory,
the logging window and the best validation loss. The model and optimiser states are the full
(unsharded) ones, expert-parallel shards gathered, so a checkpoint written by N ranks loads on any
number of ranks, with or without expert parallelism; data positions, RNG states and memories are
per rank and are restored exactly when the world size is unchanged (with another world size each
rank starts from rank 0's data position with a fresh memory, and says so).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import moe_models
import torch
import torch.distributed as dist
from moe_layers import expert_parameter_names
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from moe_train import checkpoint as ckpt
from moe_train.config import RunConfig
from moe_train.data import Batches, load_corpus
from moe_train.distributed import DistEnv, gather_to_all, mean_over_ranks, setup, sum_over_ranks
from moe_train.errors import CLIError
from moe_train.evaluate import autocast, evaluate
from moe_train.expert_parallel import (
    clip_grad_norm_,
    full_model_state,
    full_optimizer_state,
    load_optimizer_state,
    shard_experts,
)
from moe_train.metrics import MetricsLogger, RoutingAccumulator, level_metrics, uses_bpc
from moe_train.schedule import make_scheduler

RESUME_KEYS = (
    "optimizer",
    "scheduler",
    "scaler",
    "best_valid",
    "window",
    "world_size",
    "data",
    "rng",
)


@dataclass
class TrainOptions:
    out_dir: Path | None = None
    resume: bool = False
    stop_at: int | None = None
    progress: bool = True
    tensorboard: bool = True
    final_eval: bool = True


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    level: str
    valid_loss: float | None
    interrupted: bool


def default_out_dir(preset: str, env: DistEnv) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = [f"runs/{preset}-{stamp}"]
    if env.distributed:
        dist.broadcast_object_list(name, src=0)
    return Path(name[0])


def with_corpus_vocab(cfg: RunConfig, vocab_size: int) -> RunConfig:
    if cfg.model.vocab_size == vocab_size:
        return cfg
    cfg.model = moe_models.get_config(cfg.model, vocab_size=vocab_size)
    return cfg


def build_optimizer(model: torch.nn.Module, train) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on norms, biases or other vectors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2))


def detach_mems(mems):
    if mems is None:
        return None
    return [m.detach() for m in mems]


def _check_resumable(payload: dict, cfg: RunConfig) -> None:
    saved = payload["run_config"]
    path = payload["path"]
    if saved.get("model", {}).get("arch") != moe_models.config_to_dict(cfg.model)["arch"]:
        raise CLIError(
            f"checkpoint {path} is a {saved.get('model', {}).get('arch')} model "
            f"({saved.get('preset')}); this run is a {cfg.model.arch} model ({cfg.preset})"
        )
    if saved["model"] != moe_models.config_to_dict(cfg.model):
        raise CLIError(
            f"checkpoint {path} holds a different model config than this run ({saved.get('preset')} "
            f"vs {cfg.preset}); resume without model overrides"
        )


def load_model_state(model: torch.nn.Module, payload: dict) -> None:
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CLIError(
            f"checkpoint {payload['path']} does not fit this model architecture ({first[:160]})"
        ) from None


class _StopFlag:
    """Set by SIGINT/SIGTERM so that the loop stops at a step boundary and saves a checkpoint."""

    def __init__(self) -> None:
        self.set = False
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class Trainer:
    def __init__(self, cfg: RunConfig, opts: TrainOptions) -> None:
        self.opts = opts
        self.env = env = setup(cfg.train.device)
        train = cfg.train
        if train.precision == "fp16" and env.device.type != "cuda":
            raise CLIError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        # with one process there is nothing to shard over: the option is a no-op
        self.expert_parallel = train.expert_parallel and env.distributed
        if self.expert_parallel and train.precision == "fp16":
            # the grad scaler's overflow check would see different expert gradients on each rank
            raise CLIError("train.expert_parallel does not support train.precision=fp16; use bf16")
        micro = train.batch_size / (env.world_size * train.grad_accum)
        if micro != int(micro):
            raise CLIError(
                f"train.batch_size={train.batch_size} is not divisible by world size "
                f"{env.world_size} x train.grad_accum {train.grad_accum}"
            )
        self.micro_batch = int(micro)

        out_dir = opts.out_dir or default_out_dir(cfg.preset, env)
        self.out_dir = Path(out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        payload = None
        if opts.resume:
            latest = ckpt.latest(self.out_dir)
            if latest is None:
                raise CLIError(f"--resume: no checkpoint in {self.ckpt_dir} to resume from")
            payload = ckpt.load(latest)
        elif ckpt.latest(self.out_dir) is not None:
            raise CLIError(
                f"{self.out_dir} already holds a run; pass --resume to continue it or choose another --out"
            )

        self.corpus = load_corpus(cfg.data)
        self.cfg = with_corpus_vocab(cfg, self.corpus.vocab_size)
        if payload is not None:
            _check_resumable(payload, self.cfg)
        self.level = self.corpus.level
        torch.manual_seed(train.seed)
        model = moe_models.build(self.cfg.model).to(env.device)
        if payload is not None:
            # into the unwrapped model: the checkpoint holds whole experts, sharded below
            load_model_state(model, payload)
        if self.expert_parallel:
            shard_experts(model, env.world_size)
        self.model = model
        self.arch = model.arch
        self.xl = self.arch == "transformer_xl"
        self.optimizer = build_optimizer(model, train)
        self.scheduler = make_scheduler(self.optimizer, train)
        self.scaler = torch.amp.GradScaler(enabled=train.precision == "fp16")
        # dropout and expert dropout differ per rank, as they would on one bigger batch
        torch.manual_seed(train.seed * 1000 + env.rank)
        self.batches = Batches(
            self.corpus.train,
            self.micro_batch,
            self.cfg.model.seq_len,
            xl=self.xl,
            seed=train.seed,
            rank=env.rank,
            world_size=env.world_size,
            device=env.device,
        )
        self.step = 0
        self.mems = None
        self.best_valid = math.inf
        self.window = {"loss": 0.0, "aux": 0.0, "steps": 0}
        self.routing = RoutingAccumulator()
        if payload is not None:
            self._restore(payload)
        self.ddp = model
        if env.distributed:
            # each rank's expert shards are its own: DDP must not average them with other ranks'
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                model, expert_parameter_names(model)
            )
            self.ddp = DistributedDataParallel(model, find_unused_parameters=True)
        self.logger = None
        if env.is_main:
            self.logger = MetricsLogger(self.out_dir, tensorboard=opts.tensorboard)
            if payload is not None:
                self.logger.truncate_after(self.step)
            self._write_config()

    def _write_config(self) -> None:
        path = self.out_dir / "config.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        tmp.replace(path)

    def _restore(self, payload: dict) -> None:
        missing = [k for k in RESUME_KEYS if k not in payload]
        if missing:
            raise CLIError(
                f"checkpoint {payload['path']} holds no training state ({', '.join(missing)}); "
                "it can be evaluated but not resumed"
            )
        try:
            load_optimizer_state(self.optimizer, self.model, payload["optimizer"])
            self.scheduler.load_state_dict(payload["scheduler"])
            self.scaler.load_state_dict(payload["scaler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CLIError(
                f"checkpoint {payload['path']}: optimiser state does not fit ({e})"
            ) from None
        self.step = int(payload["step"])
        self.best_valid = float(payload["best_valid"])
        self.window = dict(payload["window"])
        same_world = payload["world_size"] == self.env.world_size
        r = self.env.rank if same_world else 0
        self.batches.load_state_dict(ckpt.from_plain(payload["data"][r]))
        if same_world:
            ckpt.set_rng_state(payload["rng"][r])
            mems = payload["mems"][r]
            self.mems = None if mems is None else [m.to(self.env.device) for m in mems]
        elif self.env.is_main:
            print(
                f"note: checkpoint written by {payload['world_size']} rank(s), resuming on "
                f"{self.env.world_size}: data position taken from rank 0, XL memory reset",
                file=sys.stderr,
            )

    def _payload(self) -> dict | None:
        """The checkpoint dict on rank 0 (None elsewhere); per-rank parts gathered from all ranks,
        expert shards gathered to the unsharded layout."""
        model_state = full_model_state(self.model)
        optimizer_state = full_optimizer_state(self.optimizer, self.model)
        mems = None if self.mems is None else [m.detach().cpu() for m in self.mems]
        per_rank = gather_to_all(
            {
                "data": ckpt.to_plain(self.batches.state_dict()),
                "rng": ckpt.rng_state(),
                "mems": mems,
            },
            self.env,
        )
        if not self.env.is_main:
            return None
        return {
            "run_config": self.cfg.to_dict(),
            "arch": self.arch,
            "level": self.level,
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "best_valid": self.best_valid,
            "window": dict(self.window),
            "world_size": self.env.world_size,
            "data": [p["data"] for p in per_rank],
            "rng": [p["rng"] for p in per_rank],
            "mems": [p["mems"] for p in per_rank],
        }

    def save(self, is_best: bool = False) -> None:
        payload = self._payload()
        if payload is not None:
            ckpt.CheckpointManager(self.ckpt_dir, self.cfg.train.keep_last).save(
                payload, self.step, is_best=is_best
            )

    def train_step(self) -> tuple[float, float]:
        """One optimiser step over grad_accum micro-batches; returns (lm loss, aux loss) means."""
        train = self.cfg.train
        lm_sum = aux_sum = 0.0
        for micro in range(train.grad_accum):
            inputs, targets, new_epoch = self.batches.next()
            if new_epoch:
                self.mems = None
            last = micro == train.grad_accum - 1
            sync = self.ddp.no_sync() if (self.env.distributed and not last) else _null()
            with sync:
                with autocast(self.env.device, train.precision):
                    if self.xl:
                        out = self.ddp(inputs, targets, mems=self.mems)
                    else:
                        out = self.ddp(inputs, targets)
                self.scaler.scale(out.loss / train.grad_accum).backward()
            if self.xl:
                self.mems = detach_mems(out.mems)
            lm_sum += float(out.lm_loss.detach())
            aux_sum += float(out.loss.detach()) - float(out.lm_loss.detach())
            stats = out.routing_stats
            if self.expert_parallel:
                # logged under the unwrapped layer's name, as in a run without expert parallelism
                stats = {name.removesuffix(".layer"): s for name, s in stats.items()}
            self.routing.add(stats)
        if train.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            clip_grad_norm_(self.model, train.grad_clip)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        lm, aux = mean_over_ranks([lm_sum / train.grad_accum, aux_sum / train.grad_accum], self.env)
        return lm, aux

    def validate(self, max_batches: int) -> float:
        train = self.cfg.train
        return evaluate(
            self.model,
            self.corpus.valid,
            arch=self.arch,
            batch_size=max(train.eval_batch_size // self.env.world_size, 1),
            seq_len=self.cfg.model.seq_len,
            env=self.env,
            precision=train.precision,
            max_batches=max_batches,
        )

    def run(self) -> TrainResult:
        train = self.cfg.train
        env = self.env
        end = (
            train.max_steps
            if self.opts.stop_at is None
            else min(self.opts.stop_at, train.max_steps)
        )
        tokens_per_step = train.batch_size * self.cfg.model.seq_len
        unit = "bpc" if uses_bpc(self.level) else "ppl"
        if env.is_main:
            print(
                f"training {self.cfg.preset} ({self.arch}) on {self.corpus.name} "
                f"[{self.level}], {env.world_size} process(es) on {env.device}"
                f"{', experts sharded over them' if self.expert_parallel else ''}; out: {self.out_dir}",
                flush=True,
            )
        bar = tqdm(
            total=train.max_steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.opts.progress and env.is_main),
            file=sys.stderr,
        )
        self.model.train()
        interrupted = False
        last_valid = None
        window_start = time.perf_counter()
        with _StopFlag() as stop:
            while self.step < end:
                lm, aux = self.train_step()
                self.step += 1
                self.window["loss"] += lm
                self.window["aux"] += aux
                self.window["steps"] += 1
                shown = level_metrics("train", lm, self.level)
                bar.update(1)
                if self.step % train.log_interval == 0 or self.step == end:
                    elapsed = time.perf_counter() - window_start
                    n = self.window["steps"]
                    record = {
                        "step": self.step,
                        **level_metrics("train", self.window["loss"] / n, self.level),
                    }
                    record["aux_loss"] = self.window["aux"] / n
                    record["lr"] = self.last_lr
                    record["tokens_per_s"] = n * tokens_per_step / max(elapsed, 1e-9)
                    bar.set_postfix(
                        loss=f"{record['train_loss']:.3f}",
                        **{unit: f"{record['train_' + unit]:.3f}"},
                        tok_s=f"{record['tokens_per_s']:.0f}",
                    )
                    self._log(record)
                    self.window = {"loss": 0.0, "aux": 0.0, "steps": 0}
                    window_start = time.perf_counter()
                elif self.step == 1:
                    bar.set_postfix(loss=f"{lm:.3f}", **{unit: f"{shown['train_' + unit]:.3f}"})
                if self.step % train.routing_interval == 0 and self.routing.sums:
                    summary = self.routing.summary(
                        reduce_sum=lambda v: sum_over_ranks(v, env) if env.distributed else v
                    )
                    self._log({"step": self.step, "routing": summary})
                    self.routing.reset()
                is_best = False
                if self.step % train.eval_interval == 0 and self.step < train.max_steps:
                    last_valid = self.validate(train.eval_batches)
                    is_best = last_valid < self.best_valid
                    self.best_valid = min(self.best_valid, last_valid)
                    self._log({"step": self.step, **level_metrics("valid", last_valid, self.level)})
                stop_now = bool(mean_over_ranks([float(stop.set)], env)[0] > 0)
                if self.step % train.save_interval == 0 or is_best or self.step == end or stop_now:
                    self.save(is_best=is_best)
                if stop_now:
                    interrupted = True
                    break
        bar.close()
        if self.step >= train.max_steps and self.opts.final_eval:
            last_valid = self.validate(train.final_eval_batches)
            if last_valid < self.best_valid:
                self.best_valid = last_valid
                self.save(is_best=True)
            self._log(
                {"step": self.step, **level_metrics("valid", last_valid, self.level), "final": True}
            )
        if self.logger is not None:
            self.logger.close()
        return TrainResult(self.out_dir, self.step, self.level, last_valid, interrupted)

    def _log(self, record: dict) -> None:
        if self.logger is not None:
            self.logger.log(record)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def train(cfg: RunConfig, opts: TrainOptions) -> TrainResult:
    return Trainer(cfg, opts).run()
