"""Language-model batching: Transformer-XL streams and random windows, resumable and sharded.

Both iterators yield `(inputs, targets)`, int64 arrays of shape [B, L] with targets the inputs
shifted one token ahead, and both describe the *next* batch in `state_dict()`: save it after
consuming a batch and a batcher loaded with it carries on with the batch after.
"""

from __future__ import annotations

import numpy as np


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")
    return int(value)


def _check_common(tokens, batch_size, seq_len, rank, world_size):
    tokens = np.asarray(tokens) if not isinstance(tokens, np.ndarray) else tokens
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(
            f"tokens must be a 1-D integer array, not {tokens.dtype} of shape {tokens.shape}"
        )
    batch_size = _positive_int(batch_size, "batch_size")
    seq_len = _positive_int(seq_len, "seq_len")
    world_size = _positive_int(world_size, "world_size")
    if (
        isinstance(rank, bool)
        or not isinstance(rank, (int, np.integer))
        or not 0 <= rank < world_size
    ):
        raise ValueError(f"rank must be an integer in [0, world_size={world_size}), not {rank!r}")
    if seq_len + 1 > len(tokens):
        raise ValueError(
            f"seq_len={seq_len} is longer than the data: {len(tokens)} tokens give at most"
            f" seq_len={len(tokens) - 1} (inputs plus the shifted targets)"
        )
    return tokens, batch_size, seq_len, int(rank), world_size


def _check_state(state: dict, keys: tuple[str, ...], what: str) -> dict:
    if not isinstance(state, dict) or not set(keys) <= set(state):
        raise ValueError(f"{what} state must be a dict with keys {keys}, not {state!r}")
    return state


class XLBatcher:
    """Transformer-XL ordering: the stream cut into `batch_size * world_size` contiguous streams.

    With S = batch_size * world_size streams of m = (N - 1) // S tokens, stream s holds inputs
    tokens[s*m : (s+1)*m] and targets tokens[s*m + 1 : (s+1)*m + 1]; rank r owns streams
    r*B .. (r+1)*B - 1. Batch k is columns k*L .. (k+1)*L - 1 of every stream, so row b of batch
    k+1 continues row b of batch k and recurrent memory stays valid. Each of the first S*m tokens
    is an input exactly once per epoch over all ranks; fewer than S tokens at the end are left out.
    The last batch of an epoch is shorter than L when L does not divide m, unless `drop_last`.
    """

    def __init__(
        self,
        tokens,
        batch_size: int,
        seq_len: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ):
        tokens, self.batch_size, self.seq_len, self.rank, self.world_size = _check_common(
            tokens, batch_size, seq_len, rank, world_size
        )
        streams = self.batch_size * self.world_size
        self.stream_len = (len(tokens) - 1) // streams
        if self.stream_len < 1:
            raise ValueError(
                f"batch_size * world_size = {streams} streams need at least {streams + 1} tokens,"
                f" the data has {len(tokens)}"
            )
        if drop_last and self.stream_len < self.seq_len:
            raise ValueError(
                f"seq_len={self.seq_len} is longer than each of the {streams} streams"
                f" ({self.stream_len} tokens) and drop_last leaves no batch"
            )
        self.drop_last = drop_last
        used = streams * self.stream_len
        rows = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        # views, not copies: a memory-mapped corpus stays on disk until a batch is cut
        self._inputs_BM = tokens[:used].reshape(streams, self.stream_len)[rows]
        self._targets_BM = tokens[1 : used + 1].reshape(streams, self.stream_len)[rows]
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        full, rest = divmod(self.stream_len, self.seq_len)
        return full + (1 if rest and not self.drop_last else 0)

    def batch(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch k of an epoch, without moving the position."""
        if not 0 <= k < len(self):
            raise IndexError(f"batch {k} is outside [0, {len(self)})")
        cols = slice(k * self.seq_len, (k + 1) * self.seq_len)
        return self._inputs_BM[:, cols].astype(np.int64), self._targets_BM[:, cols].astype(np.int64)

    def __iter__(self):
        """The rest of the current epoch; the next `iter()` starts the following epoch."""
        for k in range(self.position, len(self)):
            self.position = k + 1
            if self.position == len(self):
                self.epoch, self.position = self.epoch + 1, 0
            yield self.batch(k)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        state = _check_state(state, ("epoch", "position"), "XLBatcher")
        if not 0 <= state["position"] < len(self):
            raise ValueError(
                f"XLBatcher state position {state['position']} is outside [0, {len(self)})"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class RandomWindowBatcher:
    """Random windows for decoder LMs: an endless, seeded sequence of epochs.

    Epoch e (generator seeded with (seed, e)) picks a random phase in [0, L), cuts the stream
    into n = (N - L) // L back-to-back windows of L + 1 tokens (inputs and shifted targets)
    from that phase, and shuffles them. Step k gives rank r the windows at positions
    (k * world_size + r) * B .. + B of the shuffle, so ranks never share a window and each
    window is used once per epoch; an epoch is n // (B * world_size) steps.
    """

    def __init__(
        self,
        tokens,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        tokens, self.batch_size, self.seq_len, self.rank, self.world_size = _check_common(
            tokens, batch_size, seq_len, rank, world_size
        )
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, not {seed!r}")
        self.seed = int(seed)
        self.tokens = tokens
        self.windows = (len(tokens) - self.seq_len) // self.seq_len
        per_step = self.batch_size * self.world_size
        if self.windows < per_step:
            raise ValueError(
                f"the data ({len(tokens)} tokens) holds {self.windows} windows of seq_len={self.seq_len},"
                f" fewer than batch_size * world_size = {per_step}"
            )
        self.steps_per_epoch = self.windows // per_step
        self.epoch = 0
        self.position = 0
        self._order = None

    def _epoch_order(self, epoch: int) -> tuple[int, np.ndarray]:
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            phase = int(rng.integers(0, self.seq_len))
            self._order = (epoch, phase, rng.permutation(self.windows))
        return self._order[1], self._order[2]

    def window_starts(self, epoch: int, step: int) -> np.ndarray:
        """Start offsets (into `tokens`) of this rank's B windows at (epoch, step)."""
        phase, order = self._epoch_order(epoch)
        first = (step * self.world_size + self.rank) * self.batch_size
        return phase + order[first : first + self.batch_size] * self.seq_len

    def batch(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
        starts_B = self.window_starts(epoch, step)
        window_BL1 = self.tokens[starts_B[:, None] + np.arange(self.seq_len + 1)].astype(np.int64)
        return window_BL1[:, :-1], window_BL1[:, 1:]

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        epoch, step = self.epoch, self.position
        self.position += 1
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return self.batch(epoch, step)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        state = _check_state(state, ("epoch", "position"), "RandomWindowBatcher")
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"RandomWindowBatcher state has seed {state['seed']}, this batcher {self.seed}"
            )
        if not 0 <= state["position"] < self.steps_per_epoch:
            raise ValueError(
                f"RandomWindowBatcher state position {state['position']} is outside [0, {self.steps_per_epoch})"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
