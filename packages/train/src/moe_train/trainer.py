"""The training loop over a run put together by moe_train.run_setup.

`Trainer.run` is the loop; `train_step` one optimiser step. The host reads the losses only at
logging steps: each step's losses are summed on the device, and so is the first step whose loss
or gradient norm was not finite (`NonFinite`), read at logging and saving steps: such a run
stops with an error naming that step before it logs or saves anything of it, so every
checkpoint holds finite weights. What a checkpoint holds and how it is written and read:
moe_train.run_state.
"""

from __future__ import annotations

import math
import sys
import time

import torch
from moe_layers import after_optimizer_step
from tqdm import tqdm

from moe_train import checkpoint as ckpt
from moe_train import run_state
from moe_train.config import RunConfig
from moe_train.distributed import mean_over_ranks, sum_over_ranks
from moe_train.errors import CLIError
from moe_train.evaluate import autocast, evaluate
from moe_train.loop import StopFlag, Window
from moe_train.metrics import level_metrics, uses_bpc, validation_line
from moe_train.parallelize import clip_grad_norm_, scale_expert_grads
from moe_train.run_setup import RunSetup, TrainOptions, TrainResult


def detach_state(state):
    """The model state without its autograd history (it feeds the next step as an input)."""
    return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.detach(), state)


class Trainer(RunSetup):
    """Trains the run RunSetup put together: `run` loops over `train_step`, logs, validates
    and saves."""

    def run(self) -> TrainResult:
        try:
            return self._loop()
        finally:
            self.close()

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
                f"{f' ({self.layout.describe()})' if env.distributed else ''}; "
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
        with StopFlag() as stop:
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

    def _should_stop(self, stop: StopFlag) -> bool:
        """A signal's stop request; the ranks agree on it at logging steps only (an all-reduce
        every step would make every step wait for the slowest rank's host)."""
        if not self.env.distributed:
            return stop.set
        if self.step % self.cfg.train.log_interval:
            return False
        return bool(mean_over_ranks([float(stop.set)], self.env)[0] > 0)

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
            if self.mesh is not None:
                # the gradients are reduced over the ranks once, after the last micro-batch
                self.model.set_requires_gradient_sync(micro == train.grad_accum - 1)
            with autocast(self.env.device, train.precision):
                out = self.model(inputs, targets, state=self.state)
            self.scaler.scale(out.loss / train.grad_accum).backward()
            self.state = detach_state(out.state)
            lm_sum = lm_sum + out.lm_loss.detach() / train.grad_accum
            for name, value in out.aux_losses.items():
                aux_sums[name] = aux_sums.get(name, 0) + value.detach() / train.grad_accum
            self.routing.add(out.routing_stats)
        scale_expert_grads(self.model, self.layout.ep)
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
        # micro-batch of every data-parallel rank (the mesh's dp group: every rank)
        after_optimizer_step(self.model, group=self.dp_group)
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

    def _log(self, record: dict) -> None:
        if self.logger is not None:
            self.logger.log(record)

    def save(self, is_best: bool = False) -> None:
        self.check_finite()
        run_state.save(self, is_best=is_best)

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


def train(cfg: RunConfig, opts: TrainOptions) -> TrainResult:
    return Trainer(cfg, opts).run()
