"""Max/mean expert load over training from a comparison's runs: for every run, the routing
windows of its metrics.jsonl (each train.routing_interval steps), per layer max(usage) * E (1 is
perfect balance, E / K = 8 is all of a token's K slots on K experts), averaged over layers and
seeds. Usage: python load_table.py RUNS_DIR (the --out of `moe-train compare`)."""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

STEPS = (25, 100, 250, 500)


def max_over_mean(record: dict) -> float:
    layers = record["routing"].values()
    return statistics.mean(max(layer["usage"]) * len(layer["usage"]) for layer in layers)


def main(runs_dir: Path) -> None:
    by_run: dict[str, list[dict[int, float]]] = defaultdict(list)
    for metrics in sorted(runs_dir.glob("runs/*/metrics.jsonl")):
        name = metrics.parent.name.rsplit("-seed", 1)[0]
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        by_run[name].append({r["step"]: max_over_mean(r) for r in records if "routing" in r})
    print("| run | " + " | ".join(f"step {s}" for s in STEPS) + " | mean over training |")
    print("|---|" + "---|" * (len(STEPS) + 1))
    for name, seeds in by_run.items():
        cells = [statistics.mean(seed[s] for seed in seeds) for s in STEPS]
        overall = statistics.mean(statistics.mean(seed.values()) for seed in seeds)
        print(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {overall:.2f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
