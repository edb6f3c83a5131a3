"""Corpus loading and per-rank batch streams (Transformer-XL streams or random windows)."""

from __future__ import annotations

import moe_data
import torch

from moe_train.errors import CLIError


def load_corpus(spec: str | None):
    try:
        return moe_data.load(spec)
    except (moe_data.DataError, OSError) as e:
        raise CLIError(str(e).strip().splitlines()[0] if str(e).strip() else repr(e)) from None


def check_eval_split(tokens, name: str, batch_size: int, seq_len: int, rank: int, world_size: int):
    """A CLIError naming the split when it cannot give one evaluation batch (found before
    training, not at the first evaluation)."""
    try:
        moe_data.XLBatcher(tokens, batch_size, seq_len, rank=rank, world_size=world_size)
    except ValueError as e:
        raise CLIError(
            f"the {name} split ({len(tokens)} tokens) is too short to evaluate batches of "
            f"{batch_size} x seq_len {seq_len} on {world_size} rank(s) (train.eval_batch_size): {e}"
        ) from None


class Batches:
    """One rank's training batches, as int64 tensors on `device`.

    A model that carries state from segment to segment (the Transformer-XL memory) reads
    contiguous streams (XLBatcher), so that its state is that of the true preceding text;
    `next()` says when a new epoch starts, where that state must be reset. Other models draw
    random windows (RandomWindowBatcher, infinite).
    """

    def __init__(self, tokens, batch_size, seq_len, *, streams, seed, rank, world_size, device):
        self.streams = streams
        self.device = device
        try:
            if streams:
                self.batcher = moe_data.XLBatcher(
                    tokens, batch_size, seq_len, rank=rank, world_size=world_size
                )
            else:
                self.batcher = moe_data.RandomWindowBatcher(
                    tokens, batch_size, seq_len, seed=seed, rank=rank, world_size=world_size
                )
        except ValueError as e:
            raise CLIError(
                f"the train split ({len(tokens)} tokens) cannot give batches of {batch_size} "
                f"x seq_len {seq_len} on {world_size} rank(s): {e}"
            ) from None
        self._it = None

    def next(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(inputs [B, L], targets [B, L], starts_new_epoch)."""
        new_epoch = self.streams and self.batcher.position == 0
        if self._it is None:
            self._it = iter(self.batcher)
        try:
            inputs, targets = next(self._it)
        except StopIteration:
            self._it = iter(self.batcher)
            inputs, targets = next(self._it)
        return self._tensor(inputs), self._tensor(targets), new_epoch

    def _tensor(self, a) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.int64).to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        """The position of the next batch (the batchers' own state says exactly that)."""
        return self.batcher.state_dict()

    def load_state_dict(self, state: dict) -> None:
        try:
            self.batcher.load_state_dict(state)
        except ValueError as e:
            raise CLIError(f"checkpoint data position does not fit this data: {e}") from None
        self._it = None
