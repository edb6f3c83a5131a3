"""Forward+backward time of GShard, BASE, HASH, tMoE and sMoE on the CPU (2 threads; and on the
GPU when there is one) against their dense baselines, and the time of the expert-parallel token
exchange (all_to_all) between 2 gloo ranks on the CPU.

The routed FFN layers are compared with the parameter-equal DenseFFN (d_ff = E * G; the gate's
E * d_model extra parameters are not matched); sMoE, a token-mixing unit, with the dense causal
spatial gating unit CausalSGU of width 2 * d_model (whose u, v halves are d_model wide each).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from moe_layers import BaseLayer, CausalSGU, DenseFFN, GShardMoE, HashLayer, SMoE, TMoE
from timing import time_interleaved

VOCAB = 1000


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def fwd_bwd(layer, x, **kwargs):
    def step():
        layer.zero_grad(set_to_none=True)
        layer(x, **kwargs).sum().backward()

    return step


def layer_rows(quick: bool, device: str) -> list[dict]:
    batch, seq, d_model, n_experts, expert_size = (
        (4, 64, 128, 8, 64) if quick else (8, 256, 256, 16, 128)
    )
    repeats = 5 if quick else 15
    torch.manual_seed(0)
    x = torch.randn(batch, seq, d_model, device=device, requires_grad=True)
    ids = torch.randint(VOCAB, (batch, seq), device=device)
    routed = {
        "GShardMoE": (GShardMoE(d_model, n_experts, expert_size), {}),
        "BaseLayer": (BaseLayer(d_model, n_experts, expert_size), {}),
        "HashLayer": (HashLayer(d_model, n_experts, expert_size, vocab_size=VOCAB), {"token_ids": ids}),
        "TMoE": (TMoE(d_model, n_experts, expert_size), {}),
    }  # fmt: skip
    dense = DenseFFN(d_model, n_experts * expert_size)
    smoe = SMoE(d_model, n_experts, seq)
    sgu = CausalSGU(2 * d_model, seq)
    x_sgu = torch.randn(batch, seq, 2 * d_model, device=device, requires_grad=True)
    for module in [*(m for m, _ in routed.values()), dense, smoe, sgu]:
        module.to(device).train()
    fns = {name: fwd_bwd(layer, x, **kw) for name, (layer, kw) in routed.items()}
    fns["DenseFFN"] = fwd_bwd(dense, x)
    fns["SMoE"] = fwd_bwd(smoe, x)
    fns["CausalSGU"] = fwd_bwd(sgu, x_sgu)
    times = time_interleaved(fns, repeats, device=device)
    shape = f"B{batch} T{seq} D{d_model} E{n_experts} G{expert_size}"
    rows = []
    for name, module in [*((n, m) for n, (m, _) in routed.items()), ("SMoE", smoe)]:
        baseline, base_module = ("CausalSGU", sgu) if name == "SMoE" else ("DenseFFN", dense)
        rows.append(
            {
                "bench": "fwd+bwd",
                "layer": name,
                "shape": shape,
                "median_ms": times[name]["median_ms"],
                "min_ms": times[name]["min_ms"],
                "max_ms": times[name]["max_ms"],
                "baseline": baseline,
                "baseline_ms": times[baseline]["median_ms"],
                "baseline_min_ms": times[baseline]["min_ms"],
                "vs_baseline": times[name]["median_ms"] / times[baseline]["median_ms"],
                "params": n_params(module),
                "baseline_params": n_params(base_module),
                "device": device,
            }
        )
    return rows


def all_to_all_worker(
    rank: int, world: int, port: int, n_rows: int, d_model: int, repeats: int, out: str
):
    import torch.distributed as dist
    from moe_layers.parallel import AllToAll

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    gen = torch.Generator().manual_seed(rank)
    # a skewed split: rank r sends 2/3 of its rows to rank (r + 1) % 2, as uneven routing would
    send = [n_rows // 3, n_rows - n_rows // 3] if rank == 0 else [n_rows - n_rows // 3, n_rows // 3]
    recv_t = torch.empty(world, dtype=torch.long)
    dist.all_to_all_single(recv_t, torch.tensor(send))
    recv = recv_t.tolist()
    x = torch.randn(n_rows, d_model, generator=gen, requires_grad=True)

    def forward():
        with torch.no_grad():
            AllToAll.apply(x, recv, send, None)

    def forward_backward():
        AllToAll.apply(x, recv, send, None).sum().backward()

    def counts_exchange():
        dist.all_to_all_single(torch.empty(world, dtype=torch.long), torch.tensor(send))

    times = time_interleaved(
        {
            "a2a forward": forward,
            "a2a fwd+bwd": forward_backward,
            "split-size exchange": counts_exchange,
        },
        repeats,
    )
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def all_to_all_rows(quick: bool) -> list[dict]:
    n_rows, d_model = (4 * 64 * 2, 128) if quick else (8 * 256 * 2, 256)
    repeats = 10 if quick else 30
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "a2a.json")
        cmd = [
            sys.executable,
            __file__,
            "--all-to-all",
            str(n_rows),
            str(d_model),
            str(repeats),
            out,
        ]
        subprocess.run(cmd, check=True, timeout=300, cwd=Path(__file__).parent)
        times = json.loads(Path(out).read_text())
    mb = n_rows * d_model * 4 / 2**20
    return [
        {
            "bench": "all_to_all (2 gloo ranks)",
            "layer": name,
            "shape": f"{n_rows} rows x D{d_model} per rank ({mb:.2f} MiB)",
            "median_ms": t["median_ms"],
            "min_ms": t["min_ms"],
            "max_ms": t["max_ms"],
            "device": "cpu",
        }
        for name, t in times.items()
    ]


def run(quick: bool) -> list[dict]:
    torch.set_num_threads(2)
    rows = layer_rows(quick, "cpu")
    if torch.cuda.is_available():
        rows += layer_rows(quick, "cuda")
    return rows + all_to_all_rows(quick)


def main(argv: list[str]) -> None:
    import socket

    import torch.multiprocessing as mp

    n_rows, d_model, repeats, out = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(all_to_all_worker, args=(2, port, n_rows, d_model, repeats, out), nprocs=2, join=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--all-to-all"]:
        main(sys.argv[2:])
    else:
        print(json.dumps(run(quick="--quick" in sys.argv), indent=2))
