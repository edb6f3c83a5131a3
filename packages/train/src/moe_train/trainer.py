"""The training loop: AdamW, warmup + decay, clipping, accumulation, mixed precision, DDP, expert
parallelism, carried model state (the XL memory).

`Trainer.__init__` reads top to bottom as the run is put together: the output folder (created,
locked, its history checked: moe_train.rundir) and the checkpoint to resume (the newest that
loads), the data, the memory preflight (moe_train.memory), the model, the optimiser, the batches,
the restored state, the DDP wrapper and the logger. `run` is the loop; `train_step` one optimiser
step. The host reads the losses only at logging steps: each step's losses are summed on the
device, and so is the first step whose loss or gradient norm was not finite (`NonFinite`), read
at logging and saving steps: such a run stops with an error naming that step before it logs or
saves anything of it, so every checkpoint holds finite weights.

Checkpoints hold everything a resumed run needs to continue bit-for-bit: model, optimiser,
scheduler and grad-scaler states, each rank's data position, RNG states and model state (the
XL memory), the logging and routing windows and the best validation loss, so that the resumed
run's metrics.jsonl equals the uninterrupted one's (wall-clock fields aside). The model and
optimiser states are the full (unsharded) ones, expert-parallel shards gathered, so a checkpoint
written by N ranks loads on any number of ranks, with or without expert parallelism; data
positions, RNG states and model states are per rank and are restored exactly when the world size
is unchanged (with another world size each rank starts from rank 0's data position with a fresh
state, and says so).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import moe_data
import moe_models
import torch
import torch.distributed as dist
from moe_layers import after_optimizer_step, expert_parameter_names
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from moe_train import checkpoint as ckpt
from moe_train import memory, rundir
from moe_train.config import RunConfig
from moe_train.data import Batches, check_eval_split, load_corpus
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
from moe_train.metrics import (
    MetricsLogger,
    RoutingAccumulator,
    level_metrics,
    uses_bpc,
    validation_line,
)
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


def detach_state(state):
    """The model state without its autograd history (it feeds the next step as an input)."""
    return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.detach(), state)


def state_to(state, device):
    return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), state)


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


def load_model_state(model: torch.nn.Module, payload: dict) -> None:
    try:
        model.load_state_dict(payload["model"])
    except (RuntimeError, TypeError, AttributeError):
        raise CLIError(
            f"checkpoint {payload['path']} does not fit this model architecture: "
            f"{ckpt.describe_mismatch(model, payload['model'])}"
        ) from None


def has_unused_parameters(model: torch.nn.Module, seq_len: int, device) -> bool:
    """Whether a training forward and backward leaves a parameter without a gradient (DDP must
    then look for unused parameters every step, which costs a graph traversal). Probed on one
    dummy sequence, with the RNG states restored afterwards so that the run is unchanged."""
    tokens = torch.zeros(1, seq_len, dtype=torch.long, device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        out = model(tokens, tokens)
        out.loss.backward()
    unused = any(p.requires_grad and p.grad is None for p in model.parameters())
    model.zero_grad(set_to_none=True)
    return unused


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


class Window:
    """The losses of the steps since the last log, summed on the device (read when logged)."""

    def __init__(self, device) -> None:
        self.device = device
        self.steps = 0
        self.lm = torch.zeros((), dtype=torch.float64, device=device)
        self.aux: dict[str, torch.Tensor] = {}

    def add(self, lm: torch.Tensor, aux: dict[str, torch.Tensor]) -> None:
        self.steps += 1
        self.lm += lm.detach().double()
        for name, value in aux.items():
            zero = torch.zeros((), dtype=torch.float64, device=self.device)
            self.aux[name] = self.aux.get(name, zero) + value.detach().double()

    def means(self, env: DistEnv) -> tuple[float, dict[str, float]]:
        """Mean LM loss and auxiliary losses by name per step, over the ranks."""
        names = sorted(self.aux)
        values = [float(self.lm), *(float(self.aux[n]) for n in names)]
        values = [v / max(self.steps, 1) for v in mean_over_ranks(values, env)]
        return values[0], dict(zip(names, values[1:], strict=True))

    def state_dict(self) -> dict:
        return {
            "steps": self.steps,
            "lm": float(self.lm),
            "aux": {n: float(v) for n, v in self.aux.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.lm = torch.tensor(state["lm"], dtype=torch.float64, device=self.device)
        self.aux = {
            n: torch.tensor(v, dtype=torch.float64, device=self.device)
            for n, v in state["aux"].items()
        }


class NonFinite:
    """The first step whose loss or gradient norm was not finite, kept on the device (NONE: no
    such step) so that no step waits for the host to look."""

    NONE = 2**62

    def __init__(self, device) -> None:
        self.first = torch.full((), self.NONE, dtype=torch.int64, device=device)

    def update(self, step: int, *values: torch.Tensor) -> None:
        finite = torch.stack([torch.isfinite(v.detach()).all() for v in values]).all()
        self.first = torch.where(finite, self.first, self.first.clamp(max=step))

    def read(self, env: DistEnv) -> int | None:
        """The first such step on any rank (a host read; a collective when distributed)."""
        first = self.first.clone()
        if env.distributed:
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        value = int(first)
        return None if value == self.NONE else value


class Trainer:
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
        self._check_memory()
        if self.opts.overwrite and payload is None:
            self._clear_history()
        self.model = self._build_model(payload)
        self.optimizer = build_optimizer(self.model, self.cfg.train)
        self.scheduler = make_scheduler(self.optimizer, self.cfg.train)
        self.scaler = torch.amp.GradScaler(enabled=self.cfg.train.precision == "fp16")
        self.batches = self._build_batches()
        self.step = 0
        self.state = None
        self.best_valid = math.inf
        self.window = Window(self.env.device)
        self.routing = RoutingAccumulator()
        self.nonfinite = NonFinite(self.env.device)
        if payload is not None:
            self._restore(payload)
        self.ddp = self._wrap_ddp()
        self.logger = self._build_logger(resumed=payload is not None)

    def _check_options(self, train) -> int:
        """The per-rank micro-batch, after the checks that need the device and world size."""
        env = self.env
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

        payload = ckpt.load_newest(self.out_dir, on_skip=skip)
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

    def _check_memory(self) -> None:
        shards = self.env.world_size if self.expert_parallel else 1
        error = None
        try:
            memory.preflight(
                self.cfg.model, self.cfg.train, self.micro_batch, self.env.device, shards
            )
        except CLIError as e:
            error = str(e)
        # each rank checks its own device; all stop if one cannot fit
        errors = [e for e in gather_to_all(error, self.env) if e is not None]
        if errors:
            raise CLIError(errors[0])

    def _eval_batch_size(self) -> int:
        return max(self.cfg.train.eval_batch_size // self.env.world_size, 1)

    def _build_model(self, payload: dict | None) -> torch.nn.Module:
        torch.manual_seed(self.cfg.train.seed)
        model = moe_models.build(self.cfg.model).to(self.env.device)
        if payload is not None:
            # into the unwrapped model: the checkpoint holds whole experts, sharded below
            load_model_state(model, payload)
        if self.expert_parallel:
            shard_experts(model, self.env.world_size)
        if self.cfg.train.compile:
            # in place (nn.Module.compile): the module and its state-dict keys stay the plain
            # model's (no `_orig_mod.`), so checkpoints load compiled or not; graph breaks are
            # allowed for layers of plugins (and ExpertParallel's exchange, sized on the host)
            model.compile()
        return model

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

    def _wrap_ddp(self) -> torch.nn.Module:
        if not self.env.distributed:
            return self.model
        # each rank's expert shards are its own: DDP must not average them with other ranks'
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            self.model, expert_parameter_names(self.model)
        )
        unused = has_unused_parameters(self.model, self.cfg.model.seq_len, self.env.device)
        return DistributedDataParallel(self.model, find_unused_parameters=unused)

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
        self.window.load_state_dict(payload["window"])
        if "routing" in payload and self.env.is_main:
            # the window summed over the ranks that wrote it: rank 0 carries it on alone
            self.routing.load_state_dict(payload["routing"], self.env.device)
        same_world = payload["world_size"] == self.env.world_size
        r = self.env.rank if same_world else 0
        self.batches.load_state_dict(ckpt.from_plain(payload["data"][r]))
        if same_world:
            ckpt.set_rng_state(payload["rng"][r])
            self.state = state_to(payload["state"][r], self.env.device)
        elif self.env.is_main:
            print(
                f"note: checkpoint written by {payload['world_size']} rank(s), resuming on "
                f"{self.env.world_size}: data position taken from rank 0, model state reset",
                file=sys.stderr,
            )

    def _payload(self) -> dict | None:
        """The checkpoint dict on rank 0 (None elsewhere); per-rank parts gathered from all ranks,
        expert shards gathered to the unsharded layout."""
        model_state = full_model_state(self.model)
        optimizer_state = full_optimizer_state(self.optimizer, self.model)
        per_rank = gather_to_all(
            {
                "data": ckpt.to_plain(self.batches.state_dict()),
                "rng": ckpt.rng_state(),
                "state": state_to(self.state, "cpu"),
            },
            self.env,
        )
        routing = self._routing_window_state()
        if not self.env.is_main:
            return None
        return {
            "run_config": self.cfg.to_dict(),
            "arch": self.cfg.model.arch,
            "level": self.level,
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "best_valid": self.best_valid,
            "window": self.window.state_dict(),
            "routing": routing,
            "world_size": self.env.world_size,
            "data": [p["data"] for p in per_rank],
            "rng": [p["rng"] for p in per_rank],
            "state": [p["state"] for p in per_rank],
        }

    def _routing_window_state(self) -> dict:
        """The routing window summed over the ranks (rank 0's state then stands for all: the
        summary sums over ranks, so a resumed run on any number of ranks logs the same)."""
        state = self.routing.state_dict()
        if not self.env.distributed:
            return state
        gathered = gather_to_all(state, self.env)
        total = RoutingAccumulator()
        for part in gathered:
            for name, row in part["sums"].items():
                total.sums[name] = total.sums[name] + row if name in total.sums else row
                total.tokens[name] = total.tokens.get(name, 0) + part["tokens"][name]
                total.passes[name] = total.passes.get(name, 0) + part["passes"][name]
        return total.state_dict() if self.env.is_main else state

    def check_finite(self) -> None:
        """Stop the run when a step since the start had a non-finite loss or gradient norm."""
        bad = self.nonfinite.read(self.env)
        if bad is None:
            return
        raise CLIError(
            f"training diverged: the loss or gradient norm is not finite at step {bad} (found at "
            f"step {self.step}; nothing from step {bad} on was logged or saved, {self._kept()}); "
            "try a lower train.lr or train.grad_clip"
        )

    def _kept(self) -> str:
        good = ckpt.latest(self.out_dir)
        return f"the last checkpoint, {good}, is intact" if good else "no checkpoint was written"

    def save(self, is_best: bool = False) -> None:
        self.check_finite()
        payload = self._payload()
        if payload is not None:
            ckpt.CheckpointManager(self.ckpt_dir, self.cfg.train.keep_last).save(
                payload, self.step, is_best=is_best
            )

    def train_step(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimiser step over grad_accum micro-batches; returns this rank's mean LM loss and
        auxiliary losses by name, as device tensors (not read here)."""
        train = self.cfg.train
        lm_sum = torch.zeros((), device=self.env.device)
        aux_sums: dict[str, torch.Tensor] = {}
        for micro in range(train.grad_accum):
            inputs, targets, new_stream = self.batches.next()
            if new_stream:
                self.state = None
            last = micro == train.grad_accum - 1
            sync = (
                self.ddp.no_sync()
                if self.env.distributed and not last
                else contextlib.nullcontext()
            )
            with sync:
                with autocast(self.env.device, train.precision):
                    out = self.ddp(inputs, targets, state=self.state)
                self.scaler.scale(out.loss / train.grad_accum).backward()
            self.state = detach_state(out.state)
            lm_sum = lm_sum + out.lm_loss.detach() / train.grad_accum
            for name, value in out.aux_losses.items():
                aux_sums[name] = aux_sums.get(name, 0) + value.detach() / train.grad_accum
            stats = out.routing_stats
            if self.expert_parallel:
                # logged under the unwrapped layer's name, as in a run without expert parallelism
                stats = {name.removesuffix(".layer"): s for name, s in stats.items()}
            self.routing.add(stats)
        if train.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm_(self.model, train.grad_clip or math.inf)
        losses = [lm_sum, *aux_sums.values()]
        # fp16: the grad scaler skips the steps whose gradients overflowed, which is no error
        watched = losses if self.scaler.is_enabled() else [*losses, grad_norm]
        self.nonfinite.update(self.step + 1, *watched)
        self.last_lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # layers' state that follows the batches (the expert bias) over the global batch: every
        # micro-batch of every data-parallel rank (the default group: all ranks are data-parallel)
        after_optimizer_step(self.model, group=None)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return lm_sum, aux_sums

    def validate(self, max_batches: int) -> float:
        loss = evaluate(
            self.model,
            self.corpus.valid,
            batch_size=self._eval_batch_size(),
            seq_len=self.cfg.model.seq_len,
            env=self.env,
            precision=self.cfg.train.precision,
            max_batches=max_batches,
        )
        if not math.isfinite(loss):
            raise CLIError(
                f"training diverged: the validation loss at step {self.step} is {loss} "
                f"(nothing of step {self.step} was saved, {self._kept()})"
            )
        return loss

    def _log_window(self, steps_timed: int, elapsed: float, bar) -> None:
        self.check_finite()
        lm, aux = self.window.means(self.env)
        record = {"step": self.step, **level_metrics("train", lm, self.level)}
        record["aux_loss"] = sum(aux.values())
        record.update({f"aux/{name}": value for name, value in aux.items()})
        record["lr"] = self.last_lr
        tokens_per_step = self.cfg.train.batch_size * self.cfg.model.seq_len
        record["tokens_per_s"] = steps_timed * tokens_per_step / max(elapsed, 1e-9)
        unit = "bpc" if uses_bpc(self.level) else "ppl"
        bar.set_postfix(
            loss=f"{record['train_loss']:.3f}",
            **{unit: f"{record['train_' + unit]:.3f}"},
            tok_s=f"{record['tokens_per_s']:.0f}",
        )
        self._log(record)
        self.window = Window(self.env.device)

    def run(self) -> TrainResult:
        try:
            return self._loop()
        finally:
            self.close()

    def close(self) -> None:
        """Flush the logs and unlock the run folder (also after an error)."""
        if self.logger is not None:
            self.logger.close()
        self.lock.release()

    def _loop(self) -> TrainResult:
        train, env = self.cfg.train, self.env
        end = (
            train.max_steps
            if self.opts.stop_at is None
            else min(self.opts.stop_at, train.max_steps)
        )
        if env.is_main:
            print(
                f"training {self.cfg.preset} ({self.cfg.model.arch}) on {self.corpus.name} "
                f"[{self.level}], {env.world_size} process(es) on {env.device}"
                f"{', experts sharded over them' if self.expert_parallel else ''}; "
                f"out: {self.out_dir}",
                flush=True,
            )
            if self.step == 0:
                for note in train.notes():
                    print(f"note: {note}", file=sys.stderr)
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
        window_start, steps_timed = time.perf_counter(), 0
        with _StopFlag() as stop:
            while self.step < end:
                lm, aux = self.train_step()
                self.step += 1
                steps_timed += 1
                self.window.add(lm, aux)
                bar.update(1)
                # not at a stop: the window goes into the checkpoint and the resumed run logs it
                # where the uninterrupted run does
                if self.step % train.log_interval == 0 or self.step == train.max_steps:
                    self._log_window(steps_timed, time.perf_counter() - window_start, bar)
                    window_start, steps_timed = time.perf_counter(), 0
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
                    if env.is_main:
                        bar.write(validation_line(self.step, last_valid, self.level), sys.stdout)
                stop_now = self._should_stop(stop)
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
        return TrainResult(self.out_dir, self.step, self.level, last_valid, interrupted)

    def _should_stop(self, stop: _StopFlag) -> bool:
        """A signal's stop request; the ranks agree on it at logging steps only (an all-reduce
        every step would make every step wait for the slowest rank's host)."""
        if not self.env.distributed:
            return stop.set
        if self.step % self.cfg.train.log_interval:
            return False
        return bool(mean_over_ranks([float(stop.set)], self.env)[0] > 0)

    def _log(self, record: dict) -> None:
        if self.logger is not None:
            self.logger.log(record)


def train(cfg: RunConfig, opts: TrainOptions) -> TrainResult:
    return Trainer(cfg, opts).run()
