"""benchmarks/kernel_ab.py: every case runs end to end on tiny shapes, variants built from sources and flags."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from sparsify_kernels import native

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(native.library() is None, reason="no C++ compiler: native kernels unavailable")


@pytest.fixture(scope="module")
def ab():
    spec = importlib.util.spec_from_file_location("kernel_ab", ROOT / "benchmarks" / "kernel_ab.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ab")


@pytest.mark.parametrize("case", ["ffn", "screened", "planes", "predicted", "moe", "bsr", "csr", "nm", "decode-ffn"])
def test_every_case_runs_with_two_variants(ab, build_dir, case, capsys):
    ab.main([case, "base=", "noprefetch=:-DSP_PREFETCH=0", "--quick", "--rounds", "1", "--tokens", "1", "20",
             "--build-dir", str(build_dir)])
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "base:" in ln]
    assert lines and all("noprefetch:" in ln and "x (" in ln for ln in lines)
    assert "threads" in out.splitlines()[0]
    assert len(list(build_dir.glob("*.so"))) == 2  # one build per variant, reused across cases


def test_bad_variants_fail_with_one_line(ab, build_dir, tmp_path):
    with pytest.raises(SystemExit, match="NAME=DIR"):
        ab.main(["ffn", "nameless", "--quick", "--build-dir", str(build_dir)])
    with pytest.raises(SystemExit, match="no .cpp files"):
        ab.main(["ffn", f"empty={tmp_path}", "--quick", "--build-dir", str(build_dir)])


def test_shapes_pick_the_weights(ab, build_dir, capsys):
    ab.main(["bsr", "base=", "--shapes", "32x48", "16X16", "--rounds", "1", "--tokens", "20", "--build-dir",
             str(build_dir)])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "base:" in ln]
    assert [ln.split()[1] for ln in lines[::3]] == ["48->32", "16->16"]  # three sparsities each
    for bad in (["32x48x2"], ["32x40"], ["tall"]):
        with pytest.raises(SystemExit, match="OUTxIN, both multiples of 16"):
            ab.main(["csr", "base=", "--shapes", *bad, "--build-dir", str(build_dir)])


def test_evict_streams_scratch_before_every_call(ab, build_dir, capsys):
    ab.main(["bsr", "base=", "--quick", "--rounds", "1", "--tokens", "1", "--evict", "1", "--build-dir", str(build_dir)])
    out = capsys.readouterr().out
    assert "1 MB streamed before each call" in out.splitlines()[0] and "base:" in out
    assert ab._EVICT == []  # the scratch is released with the run


def test_main_leaves_the_process_as_it_found_it(ab, build_dir):
    import torch
    threads, grad, library = torch.get_num_threads(), torch.is_grad_enabled(), native.library
    ab.main(["moe", "base=", "--quick", "--rounds", "1", "--threads", "1", "--build-dir", str(build_dir)])
    assert torch.is_grad_enabled() == grad and native.library is library and torch.get_num_threads() == threads
