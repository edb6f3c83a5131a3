"""What a training checkpoint holds, and how a run writes and reads it (the files: checkpoint.py).

Everything a resumed run needs to continue as the uninterrupted run would:
- tensors (DCP, each rank its shards): the model's and the optimiser's state dicts from
  `torch.distributed.checkpoint.state_dict.get_state_dict`, keyed by parameter name with global
  shapes whatever the layout, so any layout and world size reads them (`set_state_dict`);
- meta (rank 0): run config, step, scheduler and grad-scaler states, best validation loss, the
  logging window (the same on every rank) and the routing window summed over the ranks (rank 0
  carries it on alone: its summary sums over the ranks, so any world size logs the same), the
  world size and layout that wrote it;
- own (each rank): its data position, RNG states and model state (the XL memory).

On resume with the same world size every rank takes its own part back. With another world size
every rank takes rank 0's data position (the random windows of a global batch do not depend on
the world size, so the batches continue as they would have) and starts with a fresh model state
and RNG, and the run says so.
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from moe_train import checkpoint as ckpt
from moe_train.distributed import gather_to_all
from moe_train.errors import CLIError
from moe_train.metrics import RoutingAccumulator

TRAINING_KEYS = ("scheduler", "scaler", "best_valid", "window", "world_size")


def state_to(state, device):
    return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), state)


def _routing_window(trainer) -> dict:
    """The routing window summed over the ranks (on rank 0; this rank's elsewhere)."""
    state = trainer.routing.state_dict()
    if not trainer.env.distributed:
        return state
    total = RoutingAccumulator()
    for part in gather_to_all(state, trainer.env):
        for name, row in part["sums"].items():
            total.sums[name] = total.sums[name] + row if name in total.sums else row
            total.tokens[name] = total.tokens.get(name, 0) + part["tokens"][name]
            total.passes[name] = total.passes.get(name, 0) + part["passes"][name]
    return total.state_dict() if trainer.env.is_main else state


def save(trainer, *, is_best: bool) -> None:
    """Write step `trainer.step` (a collective: every rank calls it)."""
    model_state, optimizer_state = get_state_dict(trainer.model, trainer.optimizer)
    meta = {
        "run_config": trainer.cfg.to_dict(),
        "arch": trainer.cfg.model.arch,
        "level": trainer.level,
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "step": trainer.step,
        "best_valid": trainer.best_valid,
        "window": trainer.window.state_dict(),
        "routing": _routing_window(trainer),
        "world_size": trainer.env.world_size,
        "layout": vars(trainer.layout),
    }
    own = {
        "data": ckpt.to_plain(trainer.batches.state_dict()),
        "rng": ckpt.rng_state(),
        "state": state_to(trainer.state, "cpu"),
    }
    trainer.checkpoints.save(
        meta,
        trainer.step,
        tensors={"model": model_state, "optimizer": optimizer_state},
        own=own,
        is_best=is_best,
    )


def restore(trainer, payload: dict) -> None:
    """Load the checkpoint `payload` (its meta) into the laid-out model, the optimiser and the
    rest of `trainer` (a collective)."""
    path = payload["path"]
    missing = [k for k in TRAINING_KEYS if k not in payload]
    if missing:
        raise CLIError(
            f"checkpoint {path} holds no training state ({', '.join(missing)}); "
            "it can be evaluated but not resumed"
        )
    model_state, optimizer_state = get_state_dict(trainer.model, trainer.optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        with warnings.catch_warnings():
            # DCP warns that a load without a process group is a single process's: it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=path, no_dist=not trainer.env.distributed)
        set_state_dict(
            trainer.model,
            trainer.optimizer,
            model_state_dict=model_state,
            optim_state_dict=optimizer_state,
        )
        trainer.scheduler.load_state_dict(payload["scheduler"])
        trainer.scaler.load_state_dict(payload["scaler"])
    except (KeyError, ValueError, RuntimeError, dcp.CheckpointException) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CLIError(f"checkpoint {path} does not fit this run ({reason})") from None
    trainer.step = int(payload["step"])
    trainer.best_valid = float(payload["best_valid"])
    trainer.window.load_state_dict(payload["window"])
    if "routing" in payload and trainer.env.is_main:
        trainer.routing.load_state_dict(payload["routing"], trainer.env.device)
    env = trainer.env
    same_world = payload["world_size"] == env.world_size
    own = ckpt.read_rank(path, env.rank if same_world else 0)
    trainer.batches.load_state_dict(ckpt.from_plain(own["data"]))
    if same_world:
        ckpt.set_rng_state(own["rng"])
        trainer.state = state_to(own["state"], env.device)
    elif env.is_main:
        print(
            f"note: checkpoint written by {payload['world_size']} rank(s), resuming on "
            f"{env.world_size}: data position taken from rank 0, model state reset",
            file=sys.stderr,
        )
