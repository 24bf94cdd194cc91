"""Time Wanda and SparseGPT against one plain forward pass over the same calibration data (same process).

Issue 6's target, on the CPU: Wanda on SmolLM2-135M with 64 x 256
calibration tokens takes at most about 2x one forward pass over that data
(batches of 8, logits included), SparseGPT at most 4x. Each method runs
between two forward passes and is compared with their mean, so that load
from other processes drifting during the benchmark affects both sides alike.

    python benchmarks/prune_calibration.py [--samples 64] [--seq-len 256] [--batch-size 8] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from sparsify_core import RunContext, TokenSplit
from sparsify_core.plugin_manager import catalog
from sparsify_core.sources import pack_texts


def load(model_source: str):
    cat = catalog()
    src = cat.model_sources[model_source]()
    return src.load(src.Params(), device=torch.device("cpu"), dtype=torch.float32)


class Clock:
    """Wall time and this process's CPU time (all threads) of the enclosed work.

    On a machine shared with other jobs the wall time of the same work can
    vary 3x from one minute to the next; CPU time varies much less, so both
    are reported.
    """

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


@torch.no_grad()
def forward_seconds(model, ids: torch.Tensor, batch_size: int) -> Clock:
    model.eval()
    with Clock() as clock:
        for i in range(0, len(ids), batch_size):
            model(input_ids=ids[i:i + batch_size], use_cache=False)
    return clock


def method_seconds(model_source: str, method_name: str, params: dict, ids: torch.Tensor) -> tuple[Clock, dict]:
    loaded = load(model_source)  # a fresh dense model per method (loading is not timed)
    method = catalog().methods[("prune", method_name)]()
    ctx = RunContext(run_id="bench", model=loaded.model, tokenizer=loaded.tokenizer, task=loaded.task,
                     data={"calibration": TokenSplit("calibration", ids)}, device=torch.device("cpu"),
                     dtype=torch.float32, seed=0, workdir=Path(tempfile.mkdtemp()))
    with Clock() as clock:
        result = method.apply(ctx, method.Params(**params))
    return clock, result.metrics


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args(argv)

    base = load(args.model)
    texts = catalog().data_sources["pydoc"]().texts(catalog().data_sources["pydoc"].Params())
    ids = pack_texts(base.tokenizer, texts["train"], args.seq_len, args.samples)
    print(f"{args.model}: {args.samples} x {args.seq_len} calibration tokens, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)

    forward_seconds(base.model, ids[:args.batch_size], args.batch_size)  # warm-up
    cases = {"wanda 50%": ("wanda", {"sparsity": 0.5, "batch_size": args.batch_size}),
             "sparsegpt 50%": ("sparsegpt", {"sparsity": 0.5, "batch_size": args.batch_size})}
    # Each method is bracketed by forward passes and compared with their mean, so that load from
    # other processes drifting during the benchmark affects both sides alike.
    fwd = [forward_seconds(base.model, ids, args.batch_size)]
    print(f"forward: {fwd[-1].wall:.1f}s", file=sys.stderr)
    times, ratios = {}, {}
    for label, (name, params) in cases.items():
        clock, metrics = method_seconds(args.model, name, params, ids)
        fwd.append(forward_seconds(base.model, ids, args.batch_size))
        times[label] = {"wall": clock.wall, "cpu": clock.cpu}
        ratios[label] = {k: times[label][k] / ((getattr(fwd[-2], k) + getattr(fwd[-1], k)) / 2)
                         for k in ("wall", "cpu")}
        print(f"{label}: {clock.wall:.1f}s (sparsity {metrics['sparsity']:.3f}); forward: {fwd[-1].wall:.1f}s",
              file=sys.stderr)
    report = {"model": args.model, "samples": args.samples, "seq_len": args.seq_len, "batch_size": args.batch_size,
              "forward_s": [{"wall": f.wall, "cpu": f.cpu} for f in fwd], "seconds": times,
              "ratio_to_forward": ratios}
    print("forward passes (wall / cpu): " + ", ".join(f"{f.wall:.1f}s / {f.cpu:.1f}s" for f in fwd))
    for label, t in times.items():
        r = ratios[label]
        print(f"{label:14s} wall {t['wall']:7.1f}s = {r['wall']:4.2f}x   cpu {t['cpu']:7.1f}s = {r['cpu']:4.2f}x"
              "   (x: the mean of the forward passes around it)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
