"""Runs the benchmark entries: every `bench/bench_*.py` exposes `run(quick: bool) -> list[dict]`.

Each entry's rows are printed as a table and written to `bench-results/<entry>.json`.
`python bench/run.py [--quick] [ENTRY ...]`.
"""

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "bench-results"


def print_table(title: str, rows: list[dict]) -> None:
    if not rows:
        print(f"{title}: no rows")
        return
    cols = list(dict.fromkeys(k for row in rows for k in row))

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(row.get(c, "")) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    print(f"\n## {title}")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("entries", nargs="*", help="entry names (bench_<name>.py); default all")
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats")
    args = parser.parse_args()
    available = {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}
    unknown = [e for e in args.entries if e not in available]
    if unknown:
        print(f"unknown benchmark entry {unknown}; available: {sorted(available)}", file=sys.stderr)
        return 2
    RESULTS.mkdir(exist_ok=True)
    for name in args.entries or available:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", available[name])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        started = time.time()
        threads = torch.get_num_threads()
        rows = module.run(quick=args.quick)
        threads_used = torch.get_num_threads()
        # an entry may pin its thread count; the next entry starts from the default again
        torch.set_num_threads(threads)
        print_table(name, rows)
        meta = {
            "entry": name,
            "machine": platform.node(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": threads_used,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "seconds": round(time.time() - started, 1),
            "quick": args.quick,
        }
        out = RESULTS / f"{name}.json"
        out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
        print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
