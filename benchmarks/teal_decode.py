"""Decode speed of a TEAL output against dense SmolLM2, both on the lean decode path, interleaved in one process.

TEAL (``recipes/teal.yaml``) thresholds the input of every projection; loaded
with its fast modules each projection is an ``InputSparseLinear`` and the lean
native step computes it with the input-sparse GEMV (the weight rows of zeroed
inputs are not read). The dense side is the embedded SmolLM2-135M (the model
TEAL started from) on the same lean path, so the ratio measures the skipped
rows, not decode overhead. Greedy, every token forced (no early end of
sequence), medians over ``--rounds`` interleaved runs after one warm-up each.

    python benchmarks/teal_decode.py OUTPUT [--tokens 64] [--rounds 5] [--prompt TEXT]

Prints the path each side ran on, decode tokens/s and the ratio, with the
kernel ISA and thread count. Needs the native kernels for the native step
(else both sides run the lean torch step, which the path line says).
"""
from __future__ import annotations

import argparse
import statistics

import torch


def main() -> None:
    from sparsify_core.bench import interleaved
    from sparsify_core.generation import timed_generate
    from sparsify_core.output import load_output
    from sparsify_core.plugin_manager import catalog
    from sparsify_kernels import native

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", help="a sparsify output folder of recipes/teal.yaml")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt", default="The history of sparse neural networks")
    args = ap.parse_args()
    teal = load_output(args.output, fast=True)
    src = catalog().model_sources["smollm2-135m"]
    dense = src().load(src.Params(), device=torch.device("cpu"), dtype=torch.float32)
    tok = teal.tokenizer
    ids = tok(args.prompt, return_tensors="pt").input_ids
    runs: dict[str, list] = {"dense": [], "teal": []}

    def runner(name, model):
        return lambda: runs[name].append(timed_generate(model, ids, args.tokens, tok, min_new_tokens=args.tokens,
                                                        path="lean"))

    interleaved({"dense": runner("dense", dense.model.eval()), "teal": runner("teal", teal.model)}, args.rounds,
                warmup=1)
    speed = {k: statistics.median(s.decode_tokens_per_s for s in v[1:]) for k, v in runs.items()}
    print(f"ISA {native.loaded_isa() or 'none (torch)'}, {torch.get_num_threads()} threads, {args.tokens} tokens, "
          f"medians of {args.rounds}")
    for k, v in runs.items():
        print(f"{k:6s} {v[-1].path:28s} decode {speed[k]:.1f} tok/s")
    print(f"teal / dense: {speed['teal'] / speed['dense']:.2f}x")


if __name__ == "__main__":
    main()
