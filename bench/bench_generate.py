"""Generation: each MoE against its dense counterpart, decode and prefill, side by side (issue 22).

Settings of the issue's table: vocabulary 8000, dropout 0, random weights (seed 0), greedy, one
CPU thread, thread CPU time, 32-token prompts and 32 new tokens, the two models of a pair timed
round-robin (moe_train.generation_speed.measure) and medians kept. Rows: per pair and batch, the
decode tokens/s of both, `moe_over_dense` (σ-MoE decode step time over the dense one's; targets
0.75 for the wt103-small pair, 1.0 for the tiny σ-MoE pair), each decode step over its
weight-streaming floor (`floor`: one batch-1 product over matrices holding the model's active
parameters; target at batch 1 for wt103-small: within 3x), and a prefill row (8 x 256 tokens for
wt103-small; target: the ratio at most 0.60). --quick: the tiny pairs only, 2 repeats.
"""

from __future__ import annotations

import moe_models
import torch
from moe_train.generation_speed import measure

VOCAB = 8000
WT103 = ("sigma-moe-wt103-small", "dense-wt103-small")
TINY = [("tiny-sigma-moe", "tiny-dense"), ("tiny-gshard", "tiny-decoder-dense")]
TINY += [("tiny-smlp", "tiny-gmlp")]
TARGETS = {WT103: 0.75, ("tiny-sigma-moe", "tiny-dense"): 1.0}
PREFILL_TARGET = 0.60
FLOOR_TARGET = 3.0


def _build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return moe_models.build(moe_models.get_config(name, vocab_size=VOCAB, dropout=0.0))


def _decode_row(pair, batch, speeds) -> dict:
    moe, dense = (speeds[name] for name in pair)
    row = {
        "pair": f"{pair[0]} vs {pair[1]}",
        "what": f"decode, batch {batch}",
        "moe_tokens_per_s": round(moe.decode_tokens_per_s, 1),
        "dense_tokens_per_s": round(dense.decode_tokens_per_s, 1),
        "moe_over_dense": round(moe.decode_step_s / dense.decode_step_s, 2),
        "target": TARGETS.get(pair),
        "moe_step_over_floor": round(moe.step_over_floor, 1),
        "dense_step_over_floor": round(dense.step_over_floor, 1),
        "moe_step_ms": round(moe.decode_step_s * 1e3, 2),
        "dense_step_ms": round(dense.decode_step_s * 1e3, 2),
        "moe_floor_ms": round(moe.floor_s * 1e3, 3),
        "dense_floor_ms": round(dense.floor_s * 1e3, 3),
    }
    if pair == WT103 and batch == 1:
        row["floor_target"] = FLOOR_TARGET
    return row


def run(quick: bool) -> list[dict]:
    # one thread: the setting, and thread CPU time then counts this process's work only
    torch.set_num_threads(1)
    repeats = 2 if quick else 5
    rows = []
    settings = [(pair, 1) for pair in TINY]
    if not quick:
        settings = [(WT103, 1), (WT103, 8), *settings]
    for pair, batch in settings:
        models = {name: _build(name) for name in pair}
        speeds = measure(models, batch=batch, prompt_len=32, new_tokens=32, repeats=repeats)
        rows.append(_decode_row(pair, batch, speeds))
    if not quick:
        models = {name: _build(name) for name in WT103}
        speeds = measure(models, batch=8, prompt_len=256, new_tokens=1, repeats=repeats)
        moe, dense = (speeds[name] for name in WT103)
        rows.append(
            {
                "pair": f"{WT103[0]} vs {WT103[1]}",
                "what": "prefill, 8 x 256",
                "moe_tokens_per_s": round(moe.prefill_tokens_per_s, 1),
                "dense_tokens_per_s": round(dense.prefill_tokens_per_s, 1),
                "moe_over_dense": round(moe.prefill_s / dense.prefill_s, 2),
                "target": PREFILL_TARGET,
            }
        )
    return rows
