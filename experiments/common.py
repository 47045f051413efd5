"""Helpers the experiments share: how a classifier's answers split between seen and unseen species,
and the word / word-pair indicators of a caption.

The experiments run as scripts (`python experiments/NAME.py`), so Python puts this folder first on
the import path and `from common import ...` needs no path set-up.
"""

from __future__ import annotations

import collections
import json
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np


def split_answer(clf, feats: np.ndarray, truth: np.ndarray, unseen: np.ndarray) -> dict:
    """The 102-way top-1, the share put in any unseen class, and top-1 among the unseen classes only."""
    logits = clf.logits(feats)
    top1 = clf.classes[logits.argmax(1)]
    cols = np.isin(clf.classes, unseen)
    top1_unseen = clf.classes[cols][logits[:, cols].argmax(1)]
    return {"n": int(len(truth)), "top1_102way": float((top1 == truth).mean()),
            "predicted_in_unseen_classes": float(np.isin(top1, unseen).mean()),
            "top1_20way_unseen_only": float((top1_unseen == truth).mean()),
            "most_predicted": collections.Counter(top1.tolist()).most_common(5)}


def report_summary(r: dict) -> dict:
    """The figures of one `flowercli eval` report the experiments print, one JSON line each."""
    ca, div = r["class_accuracy"], r.get("diversity") or {}
    return {"fid": round(r["fid"]["value"], 1), "n": r["fid"]["n_generated"],
            "unseen_top1_top5": [ca["test"]["top1"], ca["test"]["top5"]],
            "train_class_top1_top5": [ca["train"]["top1"], ca["train"]["top5"]], "n_other": ca["train"]["n"],
            "colour": r["colour"]["agreement"],
            "names_train_top1": r["species_names"]["train"]["top1"] if r.get("species_names") else None,
            "precision_recall": [div.get("precision"), div.get("recall")],
            "within_prompt_features_pixels": [div["within_prompt"][x]["mean"] for x in ("features", "pixels")]
            if div.get("within_prompt") else None}


def evaluate_each(gen, values: Iterable, apply: Callable, name: str, args, extra: dict | None = None) -> None:
    """For each value: `apply(value)` to the generator, run the eval protocol (`args.n`, `args.n_other`)
    with its report under `args.out`/<name><value>/, print one JSON line of the figures."""
    from flowercli.config import EvalConfig
    from flowercli.metrics.evaluate import evaluate

    for value in values:
        t0 = time.perf_counter()
        apply(value)
        out = Path(args.out) / f"{name}{value}"
        out.mkdir(parents=True, exist_ok=True)
        r = evaluate(EvalConfig(data_dir=Path(args.data_dir), out_dir=out, n=args.n, n_other=args.n_other), gen)
        print(json.dumps({name: value, **(extra or {}), **report_summary(r),
                          "seconds": round(time.perf_counter() - t0)}), flush=True)


def tokens(caption: str) -> list[str]:
    w = re.findall(r"[a-z]+(?:-[a-z]+)*", caption.lower())
    return w + [a + " " + b for a, b in zip(w, w[1:])]


def vocabulary(fit_on: list[str], min_count: int = 20) -> list[str]:
    """The words and word pairs that occur in at least `min_count` of the captions, sorted."""
    counts = collections.Counter(t for c in fit_on for t in set(tokens(c)))
    return sorted(t for t, k in counts.items() if k >= min_count)


def indicators(captions: list[str], index: dict[str, int], dtype=np.float32) -> np.ndarray:
    """(n, V) binary indicators of the words and word pairs of `index` (token -> column) in each caption."""
    out = np.zeros((len(captions), len(index)), dtype)
    for i, c in enumerate(captions):
        out[i, [index[t] for t in tokens(c) if t in index]] = 1.0
    return out
