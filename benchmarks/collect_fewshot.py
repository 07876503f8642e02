"""Collect HF-SAM few-shot rows from several ``bench_hf_sam.py --fewshot`` result files.

The few-shot curve is run one (dataset, k) at a time so that each point is saved as soon as it
finishes (``--name curve_<dataset>_k<k>``); this script merges them into one table.

Usage:
    python benchmarks/collect_fewshot.py [results/curve_*.json ...]

Writes benchmarks/results/fewshot_curve.json and prints a Markdown table (sorted by set, k).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from _common import RESULTS, save, table

COLS = [
    "dataset",
    "k",
    "steps",
    "train (s)",
    "prompt-free Dice",
    "box Dice (fine-tuned)",
    "prompts from",
    "prompt margin",
    "box Dice (fine-tuned weights)",
    "box Dice (zero-shot)",
    "bf16 training",
    "threads",
    "peak RSS (MB)",
]


def main() -> None:
    files = [Path(a) for a in sys.argv[1:]] or sorted(RESULTS.glob("curve_*.json"))
    rows = []
    for f in files:
        payload = json.loads(f.read_text())
        threads = payload.get("machine", {}).get("torch_threads")
        for row in payload.get("fewshot", []):
            # Runs from before the prompt fallback existed prompted with the fine-tuned weights;
            # the first runs with it used a 0.01 margin and did not record it.
            row.setdefault("prompt margin", 0.01 if "prompts from" in row else "none")
            row.setdefault("prompts from", "fine-tuned (no fallback yet)")
            row.setdefault("box Dice (fine-tuned weights)", row["box Dice (fine-tuned)"])
            row.setdefault("bf16 training", False)
            extra = {"threads": threads, "peak RSS (MB)": payload.get("peak_rss_mb"), "file": f.name}
            rows.append(row | extra)
    rows.sort(key=lambda r: (r["dataset"], r["k"]))
    print(table(rows, COLS))
    save("fewshot_curve", {"rows": rows})


if __name__ == "__main__":
    main()
