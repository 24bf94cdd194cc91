"""Memory of loading an output: compressed storage against dense storage of the same weights.

Issue 16's target: loading a compressed output (bitmask + values) peaks no
higher than loading the dense form of the same output. Each form is loaded in
a fresh process (``load_output(folder, fast=False)``, then one 16-token
forward, so the dense form's memory-mapped pages are all read), and the
resident set is taken above the same baseline (torch, transformers and the
plugins imported). Medians of ``--repeats`` processes per form.

    python benchmarks/load_memory.py OUTPUT [--repeats 3] [--json out.json]

``OUTPUT`` is any output folder; the other storage form is exported next to
it in a temporary folder (``export_output``, bit-exact).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, resource, sys, torch
from sparsify_core.plugin_manager import catalog
from sparsify_core import load_output
catalog()
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
base = rss()
out = load_output(sys.argv[1], fast=False)
load = rss() - base
load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
with torch.no_grad():
    out.model(torch.arange(16)[None] + 100)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
print(json.dumps({"after_load_mb": load, "load_peak_mb": load_peak, "peak_with_forward_mb": peak}))
"""


def measure(folder: Path, repeats: int) -> dict:
    """Median MB above the baseline over ``repeats`` fresh processes (Linux: reads /proc/self/statm)."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", _CHILD, str(folder)], capture_output=True, text=True, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    from sparsify_core.output import export_output
    from sparsify_core.storage import folder_bytes, manifest_of, storage_of

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", type=Path)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    form = storage_of(manifest_of(args.output)).get("form")
    other = "dense" if form == "compressed" else "compressed"
    with tempfile.TemporaryDirectory() as tmp:
        twin = export_output(args.output, Path(tmp) / other, other)
        folders = {form: args.output, other: twin}
        result = {f: dict(measure(p, args.repeats), disk_mb=folder_bytes(p) / 1e6) for f, p in folders.items()}
    print(f"{'storage':<11} {'disk MB':>8} {'after load':>11} {'load peak':>10} {'peak w/ forward':>16}   (MB above baseline, "
          f"median of {args.repeats})")
    for f in ("dense", "compressed"):
        r = result[f]
        print(f"{f:<11} {r['disk_mb']:>8.1f} {r['after_load_mb']:>11.0f} {r['load_peak_mb']:>10.0f} "
              f"{r['peak_with_forward_mb']:>16.0f}")
    ratio = result["compressed"]["peak_with_forward_mb"] / result["dense"]["peak_with_forward_mb"]
    print(f"compressed / dense peak: {ratio:.3f} (the dense form's load is lazy: its pages are read at first use)")
    if args.json:
        args.json.write_text(json.dumps(dict(result, ratio=ratio), indent=1))


if __name__ == "__main__":
    main()
