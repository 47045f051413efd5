"""Species-name prompts: does "an orange dahlia" give an orange dahlia?

Training captions describe petals and colours and almost never name the species, yet people
type names. This module holds the fixed sentences a name is put into, the (prompt, class) plan
for a set of classes, and the top-k accuracy of a classifier's predictions split into the
species the run trained on and the species it never saw. Pure numpy; `generated` generates the
images and classifies them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from flowercli.data import article, name_caption  # noqa: F401  (article: one rule for training and eval)
from flowercli.errors import DataError
from flowercli.metrics.accuracy import top_k_accuracy

# What people type: a bare noun phrase, a photo, a sentence, a name inside a longer sentence.
# "{a}" is the article the name needs; the last template's article belongs to "beautiful".
TEMPLATES = (
    "a photo of {a} {name}",
    "{a} {name} in bloom",
    "this flower is {a} {name}",
    "my garden has a beautiful {name}",
)


class NamePlan(NamedTuple):
    prompts: list[str]  # one per image
    classes: np.ndarray  # (N,) the class number (1-based) each prompt names
    templates: np.ndarray  # (N,) index into the templates


def name_plan(class_names: Sequence[str], classes: Iterable[int], seeds: int,
              templates: Sequence[str] = TEMPLATES) -> NamePlan:
    """Every class x every template x `seeds` images, class by class; `class_names[c - 1]` names class c."""
    classes = [int(c) for c in classes]
    unnamed = [c for c in classes if not 1 <= c <= len(class_names) or not str(class_names[c - 1]).strip()]
    if unnamed:
        raise DataError(f"classnames.txt names {len(class_names)} classes; class {unnamed[0]} has no name")
    rows = [(name_caption(t, class_names[c - 1]), c, k)
            for c in classes for k, t in enumerate(templates) for _ in range(seeds)]
    return NamePlan([p for p, _, _ in rows], np.array([c for _, c, _ in rows], np.int64),
                    np.array([k for _, _, k in rows], np.int64))


def species_accuracy(predicted: np.ndarray, truth: np.ndarray, train_classes: Sequence[int] | np.ndarray,
                     unseen_classes: Sequence[int] | np.ndarray, templates: np.ndarray | None = None,
                     template_names: Sequence[str] = TEMPLATES) -> dict:
    """Top-1 / top-5 of (N, k) predicted classes (best first) against the named class, for the
    training species and the unseen species separately, and top-1 per template and group."""
    predicted, truth = np.asarray(predicted), np.asarray(truth)
    out: dict = {}
    for group, classes in (("train", train_classes), ("unseen", unseen_classes)):
        rows = np.isin(truth, np.asarray(classes, np.int64))
        out[group] = {"top1": top_k_accuracy(predicted[rows, :1], truth[rows]),
                      "top5": top_k_accuracy(predicted[rows, :5], truth[rows]),
                      "n": int(rows.sum()), "classes": int(len(classes))}
        if templates is not None:
            out[group]["by_template"] = {t: top_k_accuracy(predicted[rows & (templates == k), :1],
                                                           truth[rows & (templates == k)])
                                         for k, t in enumerate(template_names)}
    return out
