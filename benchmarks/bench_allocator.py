"""CPU inference time under each allocator setting (glibc mallopt), one subprocess each.

    python benchmarks/bench_allocator.py [--quick]

Each mode runs in a fresh process (the setting is process-wide and must precede the first
large allocation): STS-Net forward at 256² and 512², and HF-SAM's LiteMedSAM image encoder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import save, table  # noqa: E402

CHILD = r"""
import json, sys, time, statistics, resource
import numpy as np, torch
import napari_medseg as nms
repeat = int(sys.argv[1])
out = {}
def med(fn):
    fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)
rng = np.random.default_rng(0)
if "sts-net" in nms.list_models():
    seg = nms.load_model("sts-net", device="cpu")
    for s in (256, 512):
        seg.config["working_size"] = s
        seg.config["input_size"] = s
        img = (rng.random((s, s)) * 255).astype(np.uint8)
        out[f"sts-net {s}"] = med(lambda: seg.segment(img, allow_untrained=True))
if "hf-sam" in nms.list_models():
    sam = nms.load_model("hf-sam", device="cpu")
    img = (rng.random((256, 256, 3)) * 255).astype(np.uint8)
    sess = sam.prompt(img)
    x = sess.image.data[0]
    out["hf-sam encoder 256"] = med(lambda: sam.encode_slice(x, None))
out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT" + json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    rows = []
    for mode in ("off", "moderate", "aggressive"):
        env = {**os.environ, "NAPARI_MEDSEG_MALLOC": mode}
        res = subprocess.run(
            [sys.executable, "-c", CHILD, "2" if args.quick else "5"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT"))
        rows.append({"malloc": mode, **json.loads(line[6:])})
        print(rows[-1], flush=True)
    cols = ["malloc"] + [k for k in rows[0] if k != "malloc"]
    print(table(rows, cols))
    print("wrote", save("bench_allocator", {"rows": rows}))


if __name__ == "__main__":
    main()
