"""A training run put together: `RunSetup.__init__` reads top to bottom as it is.

The output folder (created, locked, its history checked: moe_train.rundir) and the checkpoint to
resume (the newest that loads), the data, the memory preflight (moe_train.memory), the layout
and the model laid out over it (moe_train.build, moe_train.parallelize: device mesh, expert
parallelism, activation checkpointing, compile, FSDP2), the optimiser, the batches, the restored
state (moe_train.run_state) and the logger; `close` lets go of them. The loop that trains it:
moe_train.trainer.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import moe_data
import moe_models
import torch
import torch.distributed as dist

from moe_train import checkpoint as ckpt
from moe_train import memory, run_state, rundir
from moe_train.build import build_model, build_optimizer
from moe_train.config import RunConfig
from moe_train.data import Batches, check_eval_split, load_corpus
from moe_train.distributed import DistEnv, gather_to_all, setup
from moe_train.errors import CLIError
from moe_train.loop import NonFinite, Window
from moe_train.metrics import MetricsLogger, RoutingAccumulator
from moe_train.parallelize import build_mesh, grad_scaler, resolve_layout
from moe_train.schedule import make_scheduler


@dataclass
class TrainOptions:
    out_dir: Path | None = None
    resume: bool = False
    stop_at: int | None = None
    progress: bool = True
    tensorboard: bool = True
    final_eval: bool = True
    overwrite: bool = False


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
    """The model's vocabulary is always the data's; a vocab_size the user set is replaced, with a
    note (the preset's own is replaced without one)."""
    if cfg.model.vocab_size != vocab_size:
        if _vocab_size_was_set(cfg) and int(os.environ.get("RANK", "0")) == 0:
            print(
                f"note: vocab_size={cfg.model.vocab_size} is replaced by the data's vocabulary of"
                f" {vocab_size} (the model's vocabulary is always its data's)",
                file=sys.stderr,
            )
        try:
            cfg.model = moe_models.get_config(cfg.model, vocab_size=vocab_size)
        except ValueError as e:
            raise CLIError(
                f"model config with the data's vocabulary of {vocab_size}: {e}"
            ) from None
    return cfg


def _vocab_size_was_set(cfg: RunConfig) -> bool:
    try:
        return moe_models.get_config(cfg.preset).vocab_size != cfg.model.vocab_size
    except ValueError:
        return False


def _check_resumable(payload: dict, cfg: RunConfig) -> None:
    saved = payload["run_config"]
    path = payload["path"]
    if saved.get("model", {}).get("arch") != cfg.model.arch:
        raise CLIError(
            f"checkpoint {path} is a {saved.get('model', {}).get('arch')} model "
            f"({saved.get('preset')}); this run is a {cfg.model.arch} model ({cfg.preset})"
        )
    if saved["model"] != moe_models.config_to_dict(cfg.model):
        raise CLIError(
            f"checkpoint {path} holds a different model config than this run ({saved.get('preset')} "
            f"vs {cfg.preset}); resume without model overrides"
        )


class RunSetup:
    """The parts of a run, put together by __init__ in the order they depend on each other;
    `close` lets go of them. moe_train.trainer.Trainer trains them."""

    def __init__(self, cfg: RunConfig, opts: TrainOptions) -> None:
        self.opts = opts
        self.env = setup(cfg.train.device)
        self.micro_batch = self._check_options(cfg.train)
        self.out_dir = Path(opts.out_dir or default_out_dir(cfg.preset, self.env))
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.lock = rundir.RunLock(self.out_dir)
        try:
            self._build(cfg)
        except BaseException:
            self.lock.release()
            raise

    def _build(self, cfg: RunConfig) -> None:
        self._claim_out_dir()
        payload = self._checkpoint_to_resume()
        self.corpus = load_corpus(cfg.data)
        self.level = self.corpus.level
        self.cfg = with_corpus_vocab(cfg, self.corpus.vocab_size)
        if payload is not None:
            _check_resumable(payload, self.cfg)
        self._check_eval_split()
        self._check_memory(fresh=payload is None)
        if self.opts.overwrite and payload is None:
            self._clear_history()
        self.mesh = build_mesh(self.layout, self.env.device)
        self.dp_group = None if self.mesh is None else self.mesh["dp"].get_group()
        # a resumed run's weights come from its checkpoint (run_state.restore)
        self.model = build_model(
            self.cfg.model,
            self.cfg.train,
            self.mesh,
            self.layout,
            self.env.device,
            weights=payload is None,
        )
        self.optimizer = build_optimizer(self.model, self.cfg.train)
        self.scheduler = make_scheduler(self.optimizer, self.cfg.train)
        self.scaler = grad_scaler(self.cfg.train.precision, self.env.device, self.env.distributed)
        self.batches = self._build_batches()
        self.step = 0
        self.state = None
        self.best_valid = math.inf
        self.window = Window(self.env.device)
        self.routing = RoutingAccumulator()
        self.nonfinite = NonFinite(self.env.device)
        self.checkpoints = ckpt.CheckpointManager(
            self.ckpt_dir, self.cfg.train.keep_last, async_save=self.cfg.train.async_checkpoint
        )
        if payload is not None:
            run_state.restore(self, payload)
        self.logger = self._build_logger(resumed=payload is not None)

    def _check_options(self, train) -> int:
        """The per-rank micro-batch, after the checks that need the device and world size."""
        env = self.env
        if train.precision == "fp16" and env.device.type != "cuda":
            raise CLIError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        self.layout = resolve_layout(train, env.world_size)
        micro = train.batch_size / (env.world_size * train.grad_accum)
        if micro != int(micro):
            raise CLIError(
                f"train.batch_size={train.batch_size} is not divisible by world size "
                f"{env.world_size} x train.grad_accum {train.grad_accum}"
            )
        return int(micro)

    def _on_every_rank(self, fn):
        """fn() on rank 0, its CLIError raised on every rank (the others would otherwise wait
        for rank 0 at the next collective forever)."""
        error, result = None, None
        if self.env.is_main:
            try:
                result = fn()
            except CLIError as e:
                error = str(e)
        if self.env.distributed:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise CLIError(error)
        return result

    def _claim_out_dir(self) -> None:
        """Create and lock the run folder; refuse a fresh run into another run's history."""

        def claim():
            rundir.prepare(self.out_dir)
            note = self.lock.acquire()
            if note:
                print(note, file=sys.stderr)
            found = rundir.history(self.out_dir)
            if found and not (self.opts.resume or self.opts.overwrite):
                raise CLIError(
                    f"{self.out_dir} already holds a run ({', '.join(found)}); pass --resume to "
                    "continue it, --overwrite to replace it, or choose another --out"
                )

        self._on_every_rank(claim)

    def _clear_history(self) -> None:
        def clear():
            found = rundir.clear_history(self.out_dir)
            if found:
                print(
                    f"note: --overwrite: deleted the earlier run's {', '.join(found)} in "
                    f"{self.out_dir}",
                    file=sys.stderr,
                )

        self._on_every_rank(clear)

    def _checkpoint_to_resume(self) -> dict | None:
        """The newest checkpoint that loads; newer ones that do not are renamed out of the way
        (`NAME.unreadable`), so that neither this run's pruning nor `eval` takes them for the
        latest."""
        if not self.opts.resume:
            return None

        def skip(path: Path, reason: str) -> None:
            if not self.env.is_main:
                return
            aside = path.with_name(path.name + ".unreadable")
            try:
                path.replace(aside)
                where = f"; renamed to {aside.name}"
            except OSError:
                where = ""
            print(f"note: --resume skips {path}: {reason}{where}", file=sys.stderr)

        payload = ckpt.load_newest(self.out_dir, on_skip=skip, tensors=False)
        if payload is None:
            raise CLIError(f"--resume: no checkpoint in {self.ckpt_dir} to resume from")
        return payload

    def _check_eval_split(self) -> None:
        env = self.env
        check_eval_split(
            self.corpus.valid,
            "valid",
            self._eval_batch_size(),
            self.cfg.model.seq_len,
            env.rank,
            env.world_size,
        )

    def _check_memory(self, fresh: bool) -> None:
        error = None
        try:
            # per rank, for the layout of train.dp_replicate / dp_shard / ep on this world size
            memory.preflight(
                self.cfg.model,
                self.cfg.train,
                self.micro_batch,
                self.env.device,
                world_size=self.env.world_size,
                rank=self.env.rank,
                fresh=fresh,
            )
        except CLIError as e:
            error = str(e)
        # each rank checks its own device; all stop if one cannot fit
        errors = [e for e in gather_to_all(error, self.env) if e is not None]
        if errors:
            raise CLIError(errors[0])

    def _eval_batch_size(self) -> int:
        return max(self.cfg.train.eval_batch_size // self.env.world_size, 1)

    def _build_batches(self) -> Batches:
        env, train = self.env, self.cfg.train
        # dropout and expert dropout differ per rank, as they would on one bigger batch
        torch.manual_seed(train.seed * 1000 + env.rank)
        return Batches(
            self.corpus.train,
            self.micro_batch,
            self.cfg.model.seq_len,
            streams=self.model.carries_state,
            seed=train.seed,
            rank=env.rank,
            world_size=env.world_size,
            device=env.device,
        )

    def _build_logger(self, resumed: bool) -> MetricsLogger | None:
        if not self.env.is_main:
            return None
        logger = MetricsLogger(self.out_dir, tensorboard=self.opts.tensorboard)
        if resumed:
            logger.truncate_after(self.step)
        path = self.out_dir / "config.json"
        tmp = path.with_suffix(".json.tmp")
        try:
            tmp.write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
            tmp.replace(path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise CLIError(f"cannot write {path} ({e.strerror})") from None
        # the tokenizer travels with the run: the commands that read it never need the corpus
        tokenizer = self.out_dir / "tokenizer.json"
        try:
            moe_data.save_tokenizer(self.corpus.vocab, tokenizer)
        except OSError as e:
            raise CLIError(f"cannot write {tokenizer} ({e.strerror})") from None
        return logger

    def close(self) -> None:
        """Flush the logs and unlock the run folder (also after an error)."""
        try:
            self.checkpoints.finish()
        finally:
            if self.logger is not None:
                self.logger.close()
            self.lock.release()
