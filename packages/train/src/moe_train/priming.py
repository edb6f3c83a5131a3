"""Zero- and few-shot multiple choice ("priming") and fine-tuning on a task's examples.

Each choice is scored by the log-likelihood the LM gives its tokens after the prompt prefix
(summed over the choice's tokens; `normalize=True` divides by their number instead), and the
highest-scoring choice is the prediction. Fine-tuning trains on prefix + correct choice with the
loss on the choice's tokens only, so the model learns to answer rather than to model the prompts.

Text is encoded with `vocab`: the tokenizer that travels with the run (anything with `encode`,
a corpus too). The lm-evaluation-harness adapter scores with `choice_scores` as well, so the two
agree on the same examples.
"""

from __future__ import annotations

import random
import sys

import moe_data
import moe_layers
import torch
from torch.nn import functional as F
from tqdm import tqdm

from moe_train.errors import CLIError

IGNORE = -100


def load_task(path: str):
    try:
        return moe_data.load_tasks(path)
    except (moe_data.DataError, OSError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
        # moe_data's messages name the file already
        raise CLIError(
            message if str(path) in message else f"task file {path}: {message}"
        ) from None


def encode(vocab, text: str) -> list[int]:
    try:
        return [int(i) for i in vocab.encode(text)]
    except moe_data.DataError as e:
        raise CLIError(f"cannot encode task text with this checkpoint's vocabulary: {e}") from None


def sequence(
    prefix_ids: list[int], choice_ids: list[int], max_len: int
) -> tuple[list[int], list[int]]:
    """(inputs, targets) for prefix + choice, targets masked except the choice's tokens.

    The prefix is cut from the left so that the whole sequence fits `max_len` + 1 tokens. With an
    empty prefix the first choice token has no context and is not scored.
    """
    ids = prefix_ids + choice_ids
    n_choice = len(choice_ids)
    ids = ids[-(max_len + 1) :]
    inputs, targets = ids[:-1], ids[1:]
    n_scored = min(n_choice, len(targets))
    targets = [IGNORE] * (len(targets) - n_scored) + targets[len(targets) - n_scored :]
    return inputs, targets


def pad_batch(
    pairs: list[tuple[list[int], list[int]]], device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to a common length (pad inputs with 0, targets with IGNORE): a causal model's
    predictions for the real tokens do not see the padding after them."""
    length = max(len(i) for i, _ in pairs)
    inputs = torch.zeros(len(pairs), length, dtype=torch.int64)
    targets = torch.full((len(pairs), length), IGNORE, dtype=torch.int64)
    for row, (i, t) in enumerate(pairs):
        inputs[row, : len(i)] = torch.tensor(i, dtype=torch.int64)
        targets[row, : len(t)] = torch.tensor(t, dtype=torch.int64)
    return inputs.to(device), targets.to(device)


@torch.no_grad()
def choice_scores(model, pairs, device, normalize: bool = False) -> list[float]:
    """Log-likelihood of each (inputs, targets) pair's unmasked targets."""
    return scored_targets(model, pairs, device, normalize)[0]


@torch.no_grad()
def scored_targets(model, pairs, device, normalize: bool = False) -> tuple[list[float], list[bool]]:
    """(log-likelihood of each pair's unmasked targets, whether each of them is the model's
    argmax), from one forward of the right-padded batch."""
    inputs, targets = pad_batch(pairs, device)
    logits = model(inputs).logits.float()  # [B, L, V]
    logp = F.log_softmax(logits, dim=-1)
    mask = targets != IGNORE
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    totals = picked.sum(1)
    if normalize:
        totals = totals / mask.sum(1).clamp(min=1)
    greedy = ((logits.argmax(-1) == targets) | ~mask).all(1)
    return totals.tolist(), greedy.tolist()


def accuracy(
    model,
    vocab,
    task,
    *,
    k_shot: int,
    seed: int,
    max_len: int,
    device,
    normalize: bool = False,
    max_examples: int = 0,
    progress: bool = False,
) -> dict:
    """Multiple-choice accuracy of `model` on `task` with `k_shot` demonstrations per prompt;
    `progress`: a tqdm bar on stderr."""
    was_training = model.training
    model.eval()
    examples = task.examples if max_examples <= 0 else task.examples[:max_examples]
    correct = 0
    bar = tqdm(
        examples,
        desc=f"{task.name} k={k_shot}",
        unit="example",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    for example in bar:
        prefix, choices = moe_data.build_prompt(task, example, k_shot, seed)
        prefix_ids = encode(vocab, prefix)
        pairs = [sequence(prefix_ids, encode(vocab, c), max_len) for c in choices]
        scores = choice_scores(model, pairs, device, normalize)
        correct += int(max(range(len(scores)), key=scores.__getitem__) == example.label)
        bar.set_postfix(accuracy=f"{correct / (bar.n + 1):.3f}")
    bar.close()
    model.train(was_training)
    n = len(examples)
    return {"task": task.name, "k_shot": k_shot, "n": n, "accuracy": correct / n if n else 0.0}


def finetune(
    model,
    vocab,
    task,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    max_len: int,
    seed: int,
    device,
    grad_clip: float = 0.25,
    on_step=None,
    progress: bool = False,
) -> list[float]:
    """Train `model` on the task's examples (prefix + correct choice); returns the step losses.
    `on_step(step, loss)` is called after each step; `progress`: a tqdm bar on stderr."""
    if not task.examples:
        raise CLIError(f"task {task.name} has no examples to fine-tune on")
    pairs = []
    for example in task.examples:
        prefix, choices = moe_data.build_prompt(task, example, 0, seed)
        pairs.append(
            sequence(encode(vocab, prefix), encode(vocab, choices[example.label]), max_len)
        )
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    bar = tqdm(
        total=steps,
        desc="finetune",
        unit="step",
        disable=not progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    for step in range(1, steps + 1):
        inputs, targets = pad_batch(rng.choices(pairs, k=batch_size), device)
        out = model(inputs, targets)
        out.loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        moe_layers.after_optimizer_step(model)
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(out.lm_loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if on_step is not None:
            on_step(step, losses[-1])
    bar.close()
    return losses
