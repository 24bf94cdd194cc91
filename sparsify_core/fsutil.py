"""Atomic folder writes: build a folder aside, then swap it in place.

A leaf module (it imports nothing else of the engine): checkpoints, outputs
and training snapshots all write this way, so a crash never leaves a
half-written folder where a complete one was.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an existing ``final`` is swapped out, never half-overwritten."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def tmp_for(final: Path) -> Path:
    """A fresh empty folder next to ``final`` to write into before ``replace_dir`` moves it in place."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp
