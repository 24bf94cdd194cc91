"""The dataset of the shipped lm-eval task ``sparsify_pydoc_next``, read from the JSONL beside this file.

lm-eval imports this module by path (``custom_dataset: !function pydoc_next.load``
in the task YAML), so the data is found wherever sparsify is installed and
nothing is fetched from the Hub.
"""
from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).with_name("pydoc_next.jsonl")


def load(**_metadata):
    """``DatasetDict({"test": ...})`` of the items (context, choices, label, topic); lm-eval passes metadata, unused."""
    import datasets

    items = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(items)})
