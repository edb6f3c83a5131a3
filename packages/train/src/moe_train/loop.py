"""What a training loop keeps between steps besides the model: the stop request of a signal, the
window of losses since the last log, and the first step that was not finite."""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

from moe_train.distributed import DistEnv, mean_over_ranks


class StopFlag:
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
