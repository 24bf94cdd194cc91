"""A/B of kernel source variants: each variant compiled side by side, the same calls timed through each, interleaved.

For the claims in ``kernels/csrc`` comments ("measured: X -> Y"): copy the
sources to a folder, change them (or pass ``-D`` flags to code that reads
them), and compare against the tree as it is, in one process, so machine
noise hits every variant alike. Each variant is a ``NAME=DIR[:FLAGS]``:
``DIR`` holds the ``.cpp``/``.h`` files (empty: ``kernels/csrc``), ``FLAGS``
extra compiler flags; it is built with ``native.flags_for(--isa)`` (the
flags sparsify builds that variant with) into ``--build-dir`` and loaded
instead of ``native.library()`` while its calls run. Dense torch is timed in
the same rounds. Ratios are dense / variant; medians (``--stat min`` for
compute-bound kernels, where the minimum is the steadier estimate).

    python benchmarks/kernel_ab.py ffn   base= new=/tmp/csrc2 [--isa avx2] [--sparsity 0.5 0.9]
    python benchmarks/kernel_ab.py moe   base= pf=:-DSP_PREFETCH=0
    python benchmarks/kernel_ab.py predicted base= new=/tmp/csrc2 --sparsity 0.9
    python benchmarks/kernel_ab.py bsr   base= new=/tmp/csrc2 --tokens 1 128 1024 --sparsity 0.5 0.9
    python benchmarks/kernel_ab.py bsr   new= --sparsity 0 --tokens 1024     # every tile kept: rate vs dense
    python benchmarks/kernel_ab.py bsr   base= new=/tmp/csrc2 --shapes 4096x11008 --tokens 256 1024
    python benchmarks/kernel_ab.py decode-ffn base= new=/tmp/csrc2

With ``--isa avx2`` on an AVX-512 CPU, cap dense torch as ``sparsify bench
--isa avx2`` does (``sparsify_core/dense_isa.py``), or the AVX2 kernels race
AVX-512 GEMMs no AVX2 machine has; the first line prints dense torch's ISA:

    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 \
        python benchmarks/kernel_ab.py bsr base= new=/tmp/csrc2 --isa avx2

Cases: ``ffn`` the activation-sparse FFN (4096 x 11008, one token, FATReLU
at the quantile: ``sparsify bench`` case 1), ``screened`` the same with the
16-bit gate screen, ``planes`` with the gate in 16-bit planes, ``predicted``
with a rank-64 activation predictor (case 1's predictor rows, caches flushed
before every call), ``moe`` the MoE FFN kernel
(32-neuron experts, SiLU: case 2 without the router), ``bsr`` BSR Linear
768 <-> 3072 with 16 x 16 tiles (case 3; ``--tiles rows|columns`` their
memory order, default as the layout holds them), ``csr`` and ``nm`` case 3's other
layouts (``--tokens`` and ``--shapes`` as for ``bsr``), ``decode-ffn`` 30 activation-sparse
FFN layers of SmolLM2-135M's shape (576 x 1536) called in turn, as one
decode step does. Prints the CPU, ISA, threads and one line per
configuration.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def build(isa: str, src: Path, flags: list[str], out_dir: Path) -> ctypes.CDLL:
    """The shared library of ``src``'s sources with ``native.flags_for(isa)`` + ``flags`` (cached by content)."""
    from sparsify_kernels import native

    srcs = sorted(src.glob("*.cpp"))
    if not srcs:
        raise SystemExit(f"{src}: no .cpp files")
    cmd = native.flags_for(isa) + flags
    key = hashlib.sha256((" ".join(cmd) + "".join(p.read_text() for p in sorted(src.glob("*.*")))).encode())
    out = out_dir / f"{key.hexdigest()[:16]}.so"
    if not out.exists():
        err = native.compile_sources(srcs, out, cmd)
        if err is not None:
            raise SystemExit(f"{src} {' '.join(flags)}: build failed: {err}")
    return ctypes.CDLL(str(out))


def parse_variant(spec: str) -> tuple[str, Path, list[str]]:
    name, sep, rest = spec.partition("=")
    if not sep or not name:
        raise SystemExit(f"variant {spec!r}: write NAME=DIR[:FLAGS]")
    folder, _, flags = rest.partition(":")
    return name, Path(folder) if folder else ROOT / "kernels" / "csrc", flags.split()


_EVICT: list = []  # [scratch tensor] when --evict is set


def timed(variants: dict[str, ctypes.CDLL], fns: dict, rounds: int, stat, before=None) -> dict[tuple[str, str], float]:
    """Seconds per (variant, function): every function under every variant once per round, in turn (the
    variants' order rotating from round to round).

    ``before`` runs untimed before every call (``sparsify_core.bench.flush_caches``: cold weights); with
    ``--evict MB`` a stream through MB of scratch runs too."""
    from sparsify_kernels import native

    if _EVICT:
        first = before

        def before():
            _EVICT[0].add_(1.0)
            if first is not None:
                first()

    current: dict = {}
    real = native.library
    native.library = lambda name=None: current["lib"]  # the kernels' wrappers ask native.library() each call
    times: dict = {(v, f): [] for v in variants for f in fns}
    names = list(variants)
    try:
        for r in range(rounds + 2):
            # rotating order: in a fixed one, two copies of the same build measured 5-10% apart by position
            for v in names[r % len(names):] + names[:r % len(names)]:
                lib = variants[v]
                current["lib"] = lib
                for f, fn in fns.items():
                    if before is not None:
                        before()
                    t = time.perf_counter()
                    fn()
                    if r >= 2:  # two warm-up rounds
                        times[(v, f)].append(time.perf_counter() - t)
    finally:
        native.library = real
    return {k: stat(x) for k, x in times.items()}


def report(label: str, variants, m, dense_key="dense", fn="ours") -> None:
    v0 = next(iter(variants))
    cells = "  ".join(f"{v}: {m[(v, dense_key)] / m[(v, fn)]:.2f}x ({m[(v, fn)] * 1e3:.3f} ms)" for v in variants)
    print(f"{label:28s} dense {m[(v0, dense_key)] * 1e3:8.3f} ms   {cells}", flush=True)


def _ffn_case_weights(args):
    d, dff = (256, 1024) if args.quick else (4096, 11008)
    g = torch.Generator().manual_seed(0)
    wg, wu = torch.randn(dff, d, generator=g) / d ** 0.5, torch.randn(dff, d, generator=g) / d ** 0.5
    wd = torch.randn(d, dff, generator=g) / dff ** 0.5
    return wg, wu, wd, wd.t().contiguous(), g


def _activation_sparse(variants, args, stat, label, kernel):
    """Case 1's FFN at each sparsity (FATReLU threshold at the quantile), ``kernel(x, wg, wu, wdt, t)`` vs dense."""
    wg, wu, wd, wdt, g = _ffn_case_weights(args)
    x = torch.randn(1, wg.shape[1], generator=g)
    srt = F.linear(x, wg).flatten().sort().values
    for s in args.sparsity:
        k = min(max(int(round(s * len(srt))), 1), len(srt) - 1)
        t = float((srt[k - 1] + srt[k]) / 2)

        def dense():
            h = F.linear(x, wg)
            return F.linear(h * (h >= t) * F.linear(x, wu), wd)
        m = timed(variants, {"dense": dense, "ours": lambda: kernel(x, wg, wu, wdt, t)}, args.rounds, stat)
        report(f"{label} s={s:.0%}", variants, m)


def case_ffn(variants, args, stat):
    from sparsify_kernels import ffn as K
    _activation_sparse(variants, args, stat, "ffn", lambda x, wg, wu, wdt, t: K.ffn_sparse(
        x, wg, None, wu, None, wdt, None, act="relu", threshold=t))


def case_screened(variants, args, stat):
    from sparsify_kernels import ffn as K
    screens = {}

    def screened(x, wg, wu, wdt, t):
        if id(wg) not in screens:  # the 16-bit gate, made once (first, untimed warm-up call)
            screens[id(wg)] = K.truncation_screen(wg)
        return K.ffn_screened(x, wg, None, wu, None, wdt, None, t, screen=screens[id(wg)])
    _activation_sparse(variants, args, stat, "screened", screened)


def case_planes(variants, args, stat):
    from sparsify_kernels import ffn as K
    planes = {}

    def in_planes(x, wg, wu, wdt, t):
        if id(wg) not in planes:  # the gate's 16-bit planes, made once (first, untimed warm-up call)
            planes[id(wg)] = K.gate_planes(wg)
        return K.ffn_planes(x, None, wu, None, wdt, None, t, planes=planes[id(wg)])
    _activation_sparse(variants, args, stat, "planes", in_planes)


def case_predicted(variants, args, stat):
    """As ``sparsify bench`` case 1's predictor rows: rank 64, recall 0.99 on held-out inputs, cold weights."""
    from sparsify_core.bench import flush_caches
    from sparsify_kernels import ffn as K
    from sparsify_plugins.layouts import predictor as P
    wg, wu, wd, wdt, _ = _ffn_case_weights(args)
    d, g = wg.shape[1], torch.Generator().manual_seed(2)  # the bench's inputs
    spectrum = 1.0 / torch.arange(1, d + 1, dtype=torch.float32)
    x_fit, x_held, x = (torch.randn(n, d, generator=g) * spectrum * d ** 0.5 for n in (512, 256, 1))
    pre_fit, h_held = F.linear(x_fit, wg), F.linear(x_held, wg)
    for s in args.sparsity:
        t = float(pre_fit.flatten().kthvalue(int(round(s * pre_fit.numel()))).values)
        pred = P.fit_lowrank(x_fit, wg, None, 16 if args.quick else 64, offset=t)
        pred.threshold = P.threshold_for_recall(pred.logits(x_held), h_held >= t, 0.99)

        def dense():
            h = F.linear(x, wg)
            return F.linear(h * (h >= t) * F.linear(x, wu), wd)

        def ours():
            return K.ffn_predicted(x, wg, None, wu, None, wdt, None, act="relu", threshold=t, p_in=pred.p_in,
                                   p_out=pred.p_out, p_bias=pred.p_bias, p_threshold=pred.threshold)
        m = timed(variants, {"dense": dense, "ours": ours}, args.rounds, stat, before=flush_caches)
        report(f"predicted s={s:.0%}", variants, m)


def case_moe(variants, args, stat):
    from sparsify_kernels import ffn as K
    d, dff, size = (256, 1024, 32) if args.quick else (4096, 11008, 32)
    g = torch.Generator().manual_seed(1)
    wg, wu = torch.randn(dff, d, generator=g) / d ** 0.5, torch.randn(dff, d, generator=g) / d ** 0.5
    wd = torch.randn(d, dff, generator=g) / dff ** 0.5
    wdt = wd.t().contiguous()
    x, E = torch.randn(1, d, generator=g), dff // size
    for s in args.sparsity:
        sel = torch.zeros(1, E, dtype=torch.bool)
        sel[0, torch.randperm(E, generator=g)[: E - int(round(s * E))]] = True

        def dense():
            return F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
        m = timed(variants, {"dense": dense, "ours": lambda: K.ffn_moe(x, wg, None, wu, None, wdt, None, act="silu",
                                                                      experts=sel, expert_size=size)},
                  args.rounds, stat)
        report(f"moe skip={s:.0%}", variants, m)


def case_bsr(variants, args, stat):
    from sparsify_kernels import spmm
    g = torch.Generator().manual_seed(0)
    for out, n_in in _shapes(args):
        w = torch.randn(out, n_in, generator=g) / n_in ** 0.5
        for s in args.sparsity:
            tiles = w.abs().reshape(out // 16, 16, n_in // 16, 16).sum((1, 3))
            keep = tiles > tiles.flatten().kthvalue(max(1, int(round(s * tiles.numel())))).values
            ws = w * keep.repeat_interleave(16, 0).repeat_interleave(16, 1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch: "Sparse BSR tensor support is in beta state"
                b = ws.to_sparse_bsr((16, 16))
            val = b.values().clone()
            if args.tiles == "columns" or (args.tiles == "auto" and spmm.bsr_tiles_by_columns(16)):
                spmm.tiles_by_columns(val)  # a variant without the column kernels runs a row-major copy
            run = spmm.bsr_kernel(b.crow_indices(), b.col_indices(), val, ws.shape)
            for T in args.tokens:
                x = torch.randn(T, n_in, generator=g)
                m = timed(variants, {"dense": lambda: F.linear(x, ws), "ours": lambda: run(x)}, args.rounds, stat)
                report(f"bsr {n_in}->{out} T={T} s={s:.0%}", variants, m)


def _shapes(args) -> list[tuple[int, int]]:
    """The (out, in) weight shapes of the bsr / csr / nm cases: ``--shapes``, else case 3's 768 <-> 3072."""
    if not args.shapes:
        return [(64, 32)] if args.quick else [(3072, 768), (768, 3072)]
    try:
        shapes = [tuple(int(v) for v in spec.lower().split("x")) for spec in args.shapes]
    except ValueError:
        shapes = []
    if not shapes or any(len(sh) != 2 or min(sh) < 16 or sh[0] % 16 or sh[1] % 16 for sh in shapes):
        raise SystemExit(f"--shapes {' '.join(args.shapes)}: write OUTxIN, both multiples of 16 (e.g. 4096x11008)")
    return shapes


def _sparse_weights(args, layout):
    """(name, weight with ``layout``'s structure, params) for each shape at each sparsity: case 3's weights."""
    from sparsify_plugins.layouts.bench import _structured
    g = torch.Generator().manual_seed(0)
    for out, n_in in _shapes(args):
        w = torch.randn(out, n_in, generator=g) / n_in ** 0.5
        for s in args.sparsity:
            ws, params = _structured(w, layout, s)
            yield f"{n_in}->{out}", s, ws, params


def case_csr(variants, args, stat):
    """Panel CSR (``spmm.panel_kernel``) on unstructured sparsity: case 3's ``csr``."""
    from sparsify_kernels import spmm
    for name, s, ws, _ in _sparse_weights(args, "csr"):
        run = spmm.panel_kernel(spmm.pack(ws))
        for T in args.tokens:
            x = torch.randn(T, ws.shape[1])
            m = timed(variants, {"dense": lambda: F.linear(x, ws), "ours": lambda: run(x)}, args.rounds, stat)
            report(f"csr {name} T={T} s={s:.0%}", variants, m)


def case_nm(variants, args, stat):
    """n:m (2:4 / 1:4 / 1:10 at 50 / 75 / 90%): the permute kernel below 16 tokens (AVX-512), else panel CSR."""
    from sparsify_core.plugin_manager import catalog
    from sparsify_plugins.layouts.modules import SparseLinear
    for name, s, ws, params in _sparse_weights(args, "nm"):
        mod = SparseLinear(catalog().layouts["nm"].from_dense(ws, params))
        for T in args.tokens:
            x = torch.randn(T, ws.shape[1])
            m = timed(variants, {"dense": lambda: F.linear(x, ws), "ours": lambda: mod(x)}, args.rounds, stat)
            report(f"nm {name} T={T} s={s:.0%}", variants, m)


def case_decode_ffn(variants, args, stat):
    from sparsify_kernels import ffn as K
    d, dff, layers = (576, 1536, 4 if args.quick else 30)
    g = torch.Generator().manual_seed(0)
    ws = [(torch.randn(dff, d, generator=g) / d ** 0.5, torch.randn(dff, d, generator=g) / d ** 0.5,
           torch.randn(dff, d, generator=g) / dff ** 0.5) for _ in range(layers)]
    x = torch.randn(1, d, generator=g)
    for s in args.sparsity:
        ts = []
        for wg, _, _ in ws:
            srt = F.linear(x, wg).flatten().sort().values
            k = min(max(int(round(s * dff)), 1), dff - 1)
            ts.append(float((srt[k - 1] + srt[k]) / 2))

        def dense():
            for (wg, wu, wdt), t in zip(ws, ts):
                h = F.linear(x, wg)
                F.linear(h * (h >= t) * F.linear(x, wu), wdt.T)

        def ours():
            for (wg, wu, wdt), t in zip(ws, ts):
                K.ffn_sparse(x, wg, None, wu, None, wdt, None, act="relu", threshold=t)
        m = timed(variants, {"dense": dense, "ours": ours}, args.rounds, stat)
        report(f"decode-ffn x{layers} s={s:.0%}", variants, m)


CASES = {"ffn": (case_ffn, [0.3, 0.5, 0.7, 0.9, 0.95]), "screened": (case_screened, [0.7, 0.9, 0.95]),
         "planes": (case_planes, [0.3, 0.5, 0.7, 0.9]),
         "predicted": (case_predicted, [0.9, 0.95]), "moe": (case_moe, [0.25, 0.5, 0.75]),
         "bsr": (case_bsr, [0.5, 0.75, 0.9]), "csr": (case_csr, [0.5, 0.75, 0.9]), "nm": (case_nm, [0.5, 0.75, 0.9]),
         "decode-ffn": (case_decode_ffn, [0.86, 0.7])}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("case", choices=sorted(CASES))
    p.add_argument("variants", nargs="+", help="NAME=DIR[:FLAGS] (DIR empty: kernels/csrc)")
    p.add_argument("--isa", default=None, help="kernel variant to build (default: the widest this CPU runs)")
    p.add_argument("--sparsity", type=float, nargs="+", default=None)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 128, 1024], help="bsr: token counts")
    p.add_argument("--shapes", nargs="+", default=None, metavar="OUTxIN",
                   help="bsr / csr / nm: weight shapes, multiples of 16 (default 3072x768 768x3072, case 3's)")
    p.add_argument("--tiles", choices=["auto", "rows", "columns"], default="auto",
                   help="bsr: the tiles' memory order (auto: as the BSR layout holds them with this tree's kernels)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--stat", choices=["median", "min"], default="median")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--build-dir", type=Path, default=Path("/tmp/sparsify-kernel-ab"))
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test, not a measurement")
    p.add_argument("--evict", type=int, default=0, metavar="MB",
                   help="stream MB of scratch before every call (e.g. 8: the weights leave L2 but stay in a "
                        "large L3, as between the candidates of `sparsify bench` case 3)")
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        _run(args)
    finally:
        torch.set_num_threads(threads)
        _EVICT.clear()


def _run(args) -> None:
    from sparsify_core.bench import machine
    from sparsify_kernels import native

    isa = args.isa or native.isa()
    fn, default_s = CASES[args.case]
    args.sparsity = args.sparsity or default_s
    variants = {name: build(isa, folder, flags, args.build_dir)
                for name, folder, flags in map(parse_variant, args.variants)}
    _EVICT[:] = [torch.zeros(args.evict << 18)] if args.evict else []
    info = machine()
    print(f"{info.get('cpu_model')} | kernels {isa} | dense torch {info['dense_isa']} | {torch.get_num_threads()} "
          f"threads | torch {torch.__version__} | {args.stat} of {args.rounds} rounds"
          + (f" | {args.evict} MB streamed before each call" if args.evict else ""), flush=True)
    with torch.no_grad():  # not set_grad_enabled(False): main() is also called in-process (its tests)
        fn(variants, args, statistics.median if args.stat == "median" else min)


if __name__ == "__main__":
    main()
