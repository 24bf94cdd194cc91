"""Build ``pydoc_next.jsonl``: the shipped offline lm-eval task ``sparsify_pydoc_next``.

Multiple-choice next sentence from the EVAL partition of the ``pydoc`` data
source (``pydoc_data.topics``, split as ``data: {source: pydoc}`` splits it
by default: ``eval_fraction`` 0.1, ``seed`` 0), never from train, so a model
trained on the train partition has not seen an item. An item is two
prose sentence of a paragraph (with the one before it, when there is one)
as ``context``, the sentence that follows it as the right answer, and three sentences drawn from other
topics of the eval partition as wrong answers, in a shuffled order: chance
is 25%. Deterministic (a fixed ``random.Random`` seed); ``pydoc_data`` differs
between Python versions, so the shipped file records the version it came
from and is the reference, not the script's output elsewhere.

Run: ``python -m sparsify_plugins.metrics.lm_eval_tasks.make_pydoc_next``.
"""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "pydoc_next.jsonl"
ITEMS = 300
SEED = 14
CHOICES = 4
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"*])")


def prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of running prose: blank-line separated, indented at most 3 spaces (not code, not a table)."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or any(len(ln) - len(ln.lstrip()) > 3 for ln in lines):
            continue
        para = " ".join(ln.strip() for ln in lines)
        if para.endswith(":") or ">>>" in para or "***" in para or "===" in para:
            continue
        out.append(para)
    return out


def sentences(paragraph: str) -> list[str]:
    """Sentences of 25-250 characters that end in a full stop (shorter or longer ones are rarely prose)."""
    return [s for s in _SENTENCE_END.split(paragraph) if 25 <= len(s) <= 250 and s[-1] in ".!?"]


def build(eval_texts: dict[str, str], n_items: int = ITEMS, seed: int = SEED) -> list[dict]:
    """The items from ``eval_texts`` (topic name -> text): context, choices, label, topic."""
    rng = random.Random(seed)
    runs: list[tuple[str, str, str]] = []  # (topic, context, the next sentence of the same paragraph)
    pool: dict[str, list[str]] = {}
    for topic in sorted(eval_texts):
        for para in prose_paragraphs(eval_texts[topic]):
            sents = sentences(para)
            pool.setdefault(topic, []).extend(sents)
            runs.extend((topic, " ".join(sents[max(i - 1, 0):i + 1]), sents[i + 1]) for i in range(len(sents) - 1))
    rng.shuffle(runs)
    items, used = [], set()
    for topic, context, right in runs:
        if len(items) == n_items:
            break
        if right in used:
            continue
        others = sorted({s for t, sents in pool.items() if t != topic for s in sents} - {right})
        wrong = rng.sample(others, CHOICES - 1)
        choices = [right, *wrong]
        rng.shuffle(choices)
        used.add(right)
        items.append({"context": context, "choices": choices, "label": choices.index(right), "topic": topic})
    return items


def main() -> None:
    from pydoc_data.topics import topics

    from sparsify_plugins.sources.data import split_by_group

    _, eval_names = split_by_group(topics, 0.1, 0)  # the pydoc source's default eval partition
    items = build({n: topics[n] for n in eval_names})
    with OUT.open("w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(f"{len(items)} items from {len(eval_names)} eval topics (Python {sys.version.split()[0]}) -> {OUT}")


if __name__ == "__main__":
    main()
