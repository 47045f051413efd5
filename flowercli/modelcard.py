"""The model card written beside an exported generator, in the Hugging Face layout.

`model_card` builds the text from what the export records (config, encoder, data, and in `meta`
the eval report that belongs to the exported checkpoint and, when a release recorded them, the
training time and machine); it reads and writes nothing, so every line of it is testable on
plain dicts. `write_model_card` is the I/O around it.

The card is `<name>.md` beside `<name>.safetensors` (or `.pt`): exporting into a folder never
replaces a README.md that is already there, and two models can share a folder. To publish a model
on the Hugging Face Hub, upload its card as the repository's README.md.

Nothing here is estimated: a fact the export does not record is said to be not recorded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATASET_ID = "oxford_flowers102"  # the name torchvision and TFDS give the dataset
TAGS = ("text-to-image", "gan", "flowers", "oxford-102", "flowercli")


@dataclass(frozen=True)
class Figure:
    """One evaluation figure as the card shows it: value, sample size and real-data ceiling."""

    name: str  # what it measures, e.g. "FID, unseen-class captions"
    type: str  # model-index metric type, e.g. "fid"
    value: float
    n: str  # sample size in words, e.g. "2,048 generated vs 1,464 real"
    ceiling: float | None
    ceiling_n: str = ""
    percent: bool = False  # shown as a percentage in the table (the value itself stays a fraction)


def _num(x: Any) -> float | None:
    """A finite float, else None (reports write NaN as null when a metric had too few images)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def figures(report: dict[str, Any]) -> list[Figure]:
    """The figures of an eval report.json that are present, in the order of `flowercli eval`'s table.

    Reports of older flowercli versions lack some sections (diversity, species names); those
    figures are simply absent, never filled in.
    """
    out: list[Figure] = []
    split = str(_get(report, "protocol", "split") or "test")

    def side(name: str) -> str:
        group = _get(report, "class_accuracy", name) or {}
        if group.get("unseen_classes"):
            return "unseen-class captions"
        return "training-class captions" if name == "train" else f"{name}-split captions"

    fid = report.get("fid") or {}
    if (value := _num(fid.get("value"))) is not None:
        out.append(Figure(f"FID, {side(split)}", "fid", value,
                          f"{_count(fid.get('n_generated'))} generated vs {_count(fid.get('n_real'))} real",
                          _num(_get(fid, "ceiling", "value")),
                          f"{_count(_get(fid, 'ceiling', 'n_a'))} vs {_count(_get(fid, 'ceiling', 'n_b'))} real"))
    accuracy = report.get("class_accuracy") or {}
    for name in [split] + sorted(k for k in accuracy if k not in (split, "classifier")):
        group = accuracy.get(name)
        if not isinstance(group, dict):
            continue
        for k in ("top1", "top5"):
            if (value := _num(group.get(k))) is not None:
                out.append(Figure(f"class {k[:3]}-{k[3:]}, {side(name)}", "accuracy", value,
                                  f"{_count(group.get('n'))} images", _num(_get(group, "ceiling", k)),
                                  f"{_count(_get(group, 'ceiling', 'n'))} real", percent=True))
    colour = report.get("colour") or {}
    if (value := _num(colour.get("agreement"))) is not None:
        out.append(Figure("colour agreement", "accuracy", value,
                          f"{_count(colour.get('n'))} images",
                          _num(_get(colour, "ceiling", "agreement")),
                          f"{_count(_get(colour, 'ceiling', 'n_images'))} real", percent=True))
    div = report.get("diversity") or {}
    for k in ("precision", "recall", "density", "coverage"):
        if (value := _num(div.get(k))) is not None:
            out.append(Figure(f"{k} (k-NN, k = {div.get('k', '?')})", k, value,
                              f"{_count(div.get('n_generated'))} generated vs {_count(div.get('n_real'))} real",
                              _num(_get(div, "ceiling", k)),
                              f"{_count(_get(div, 'ceiling', 'n_a'))} vs {_count(_get(div, 'ceiling', 'n_b'))} real"))
    within = div.get("within_prompt") or {}
    if (value := _num(_get(within, "features", "mean"))) is not None:
        out.append(Figure("within-prompt diversity (Inception features)", "diversity", value,
                          f"{within.get('prompts', '?')} captions x {within.get('seeds', '?')} seeds",
                          _num(within.get("ceiling")), "real images"))
    names = report.get("species_names") or {}
    for group, words in (("unseen", "unseen species"), ("train", "training species")):
        g = names.get(group) or {}
        if (value := _num(g.get("top1"))) is not None and g.get("n"):
            out.append(Figure(f"species-name prompts, {words}, top-1", "accuracy", value,
                              f"{_count(g['n'])} images", _num(_get(g, "ceiling", "top1")),
                              f"{_count(_get(g, 'ceiling', 'n'))} real", percent=True))
    return out


# ---------------------------------------------------------------------------------------------
# YAML front matter. A few lines of emitter instead of a dependency: every string is written as
# a JSON string, which YAML reads as a double-quoted scalar, so no value can break the block.


def _scalar(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v), ensure_ascii=False)


def _yaml(obj: Any, indent: int = 0) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{pad}{k}:")
                lines += _yaml(v, indent + 2)
            else:
                lines.append(f"{pad}{k}: {_scalar(v) if not isinstance(v, (dict, list)) else json.dumps(v)}")
    else:  # a list: dicts as "- key: ..." blocks, anything else as "- value"
        for item in obj:
            if isinstance(item, dict) and item:
                block = _yaml(item, indent + 2)
                lines.append(f"{pad}- {block[0].lstrip()}")
                lines += block[1:]
            else:
                lines.append(f"{pad}- {_scalar(item)}")
    return lines


def front_matter(name: str, figs: list[Figure], split: str | None, unseen: bool) -> dict[str, Any]:
    meta: dict[str, Any] = {"license": "mit", "library_name": "flowercli", "pipeline_tag": "text-to-image",
                            "tags": list(TAGS), "datasets": [DATASET_ID]}
    if figs:
        which = "unseen classes" if unseen else "training classes" if split == "train" else f"{split} split"
        meta["model-index"] = [{"name": name, "results": [{
            "task": {"type": "text-to-image", "name": "Text-to-image generation"},
            "dataset": {"name": f"Oxford 102 Flowers ({which})", "type": DATASET_ID, "split": split or "test"},
            "metrics": [{"name": f.name, "type": f.type, "value": round(f.value, 4)} for f in figs]}]}]
    return meta


# ---------------------------------------------------------------------------------------------
# The card.


def _fmt(f: Figure, v: float | None) -> str:
    if v is None:
        return "—"
    return f"{100 * v:.1f} %" if f.percent else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def caption_set(state: dict[str, Any]) -> dict[str, str] | None:
    """{"archive", "sha256", "note"?} of the captions the generator was trained on, None if not recorded.

    The embeddings file records it and every checkpoint copies that record into "encoder"; an
    export of a checkpoint older than that record may carry one added at release in meta.
    """
    enc = state.get("encoder") or {}
    rec = _get(state, "meta", "caption_set")
    if enc.get("captions_sha256"):
        out = {"archive": str(enc.get("captions_archive") or "unknown"), "sha256": str(enc["captions_sha256"])}
        # A release may add how the set was established: its note, for this same set only.
        if isinstance(rec, dict) and rec.get("note") and str(rec.get("sha256")) == out["sha256"]:
            out["note"] = str(rec["note"])
        return out
    if isinstance(rec, dict) and rec.get("sha256"):
        return {k: str(v) for k, v in rec.items()}
    return None


def model_card(state: dict[str, Any], file_name: str, file_bytes: int | None = None) -> str:
    """The model card (Markdown with YAML front matter) of an export whose entries are `state`.

    `state` is what `load_checkpoint` returns for the export (the tensors are not used); `file_name`
    is the exported file's name, used in the usage example and as the model's name.
    """
    config = state.get("config") or {}
    model = config.get("model") or {}
    enc = state.get("encoder") or {}
    data = state.get("data") or {}
    meta = state.get("meta") or {}
    report = evaluated if isinstance(evaluated := meta.get("eval"), dict) else None
    training = recorded if isinstance(recorded := meta.get("training"), dict) else {}
    name = Path(file_name).stem
    figs = figures(report) if report else []
    split = _get(report, "protocol", "split") if report else None
    unseen = bool(_get(report, "class_accuracy", str(split), "unseen_classes")) if report else False
    size = model.get("image_size", "?")
    step = state.get("step")

    lines = ["---", *_yaml(front_matter(name, figs, split, unseen)), "---", ""]
    lines += [f"# {name}: a text-to-flower GAN generator", ""]

    # What it is.
    lines += ["## What it is", "",
              f"The EMA generator of a text-conditional GAN trained with flowercli (recipe "
              f"`{config.get('recipe', 'unknown')}`), exported at step {_int(step)}"
              f"{' as ' + meta['dtype'] + ' weights' if meta.get('dtype') else ''}. It turns an English sentence "
              f"describing a flower into a {size}×{size} RGB image. The sentence is embedded with "
              f"`{enc.get('encoder', 'unknown')}` ({enc.get('pooling', 'mean')} pooling, {enc.get('dim', '?')}-d"
              f"{', unit-normalised' if enc.get('normalised') else ''}), which `flowercli generate` loads by itself.",
              "", "```bash",
              f'flowercli generate "this flower has yellow petals" -n 16 --checkpoint {file_name}', "```",
              ""]
    if file_bytes is not None:
        lines += [f"File: `{file_name}`, {file_bytes / 1e6:.1f} MB.", ""]

    # Training data.
    n_train = len(data["classes"]) if isinstance(data.get("classes"), list) else model.get("n_classes")
    lines += ["## Training data", "",
              "Images of the Oxford 102 Category Flower dataset (Nilsback and Zisserman, 2008) with ten captions "
              "per image."]
    caps = caption_set(state)
    if caps is None:
        lines += ["This model does not record which caption set it was trained on."]
    else:
        lines += [f"The captions are the caption set `{caps['archive']}`, sha256 `{caps['sha256']}`."
                  + (f" {caps['note']}" if caps.get("note") else "")]
    split_mode = data.get("split") or config.get("split")
    if split_mode == "classes":
        held = _get(report, "class_accuracy", "test", "classes") if report else None
        lines += [f"Split by class: trained on the images of {n_train} classes; the dataset's other "
                  f"{str(held) + ' ' if isinstance(held, int) else ''}classes were never seen in training "
                  "(the unseen classes of the evaluation)."]
    elif split_mode:
        lines += [f"Split `{split_mode}` of flowercli train ({n_train} classes in training)."]
    lines += [""]

    # Recipe.
    rows = [("recipe", config.get("recipe")), ("image size", f"{size}×{size}"),
            ("channels (G / D)", f"{model.get('g_channels')} / {model.get('d_channels')}"),
            ("noise / condition size", f"{model.get('noise_dim')} / {model.get('cond_dim')}"),
            ("loss", model.get("loss")), ("learning rates (G / D)", f"{config.get('lr_g')} / {config.get('lr_d')}"),
            ("Adam betas", f"{config.get('beta1')}, {config.get('beta2')}"), ("batch size", config.get("batch_size")),
            ("EMA decay", config.get("ema")), ("seed", config.get("seed"))]
    # The two settings that change what a user gets most, spelled out rather than left in the list below.
    if (_num(config.get("name_mix")) or 0) > 0:
        rows.append(("species-name captions in training",
                     f"{_num(config.get('name_mix')):.0%} of the training captions replaced by a sentence naming "
                     f"the image's species (`--set name_mix={_plain(config.get('name_mix'))}`)"))
    if model.get("cond_aug"):
        rows.append(("condition at generation", "sampled per image from its seed (`model.sample_condition=true`; "
                     "`--mean-condition` uses the caption's mean)" if model.get("sample_condition") else
                     "the caption's mean (`--sample-condition` draws it per image from its seed)"))
    lines += ["## Recipe", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in rows if v is not None and "None" not in str(v)]
    others = ", ".join(f"`{k}={_plain(v)}`" for k, v in model.items()
                       if k not in ("image_size", "g_channels", "d_channels", "noise_dim", "cond_dim", "loss"))
    lines += ["", f"Every model setting (`flowercli train --set model.NAME=VALUE`): {others}." if others else "", ""]

    # Budget.
    lines += ["## Training budget", ""]
    budget = [f"{_int(step)} steps"]
    if state.get("epoch") is not None:
        budget.append(f"{_int(state['epoch'])} epochs")
    if config.get("batch_size"):
        budget.append(f"batch {config['batch_size']}")
    lines += ["; ".join(budget) + "."]
    if (cpu_s := _num(training.get("cpu_seconds"))) is not None:
        wall = f", {_num(training['wall_seconds']):,.0f} s wall" if _num(training.get("wall_seconds")) else ""
        lines += [f"{cpu_s:,.0f} CPU-seconds ({cpu_s / 3600:.2f} CPU-hours){wall}."]
    else:
        lines += ["CPU time: not recorded."]
    lines += [f"Machine: {training['device']}." if training.get("device") else "Machine: not recorded.", ""]

    # Evaluation.
    lines += ["## Evaluation", ""]
    if not figs or report is None:  # no report, no figures
        lines += ["No evaluation report was exported with this model. Measure it with "
                  f"`flowercli eval --checkpoint {file_name} --data-dir DATA` (the data it was trained on).", ""]
    else:
        proto = report.get("protocol") or {}
        condition = ("condition sampled per image" if proto.get("condition") == "sampled"
                     else "the mean condition of each caption")
        psi = _num(proto.get("truncation"))
        lines += [f"`flowercli eval` (its protocol: docs/EVALUATION.md of flowercli), {split} side of the split, "
                  f"seed {proto.get('seed', '?')}, "
                  f"{condition}{'' if psi in (None, 1.0) else f', truncation {psi}'}"
                  f", images {_get(report, 'run', 'image_size') or size}×{_get(report, 'run', 'image_size') or size}. "
                  "Every figure is shown beside its ceiling: the same measure on real images.", "",
                  "| figure | value | N | ceiling (real data) |", "| --- | --- | --- | --- |"]
        lines += [f"| {f.name} | {_fmt(f, f.value)} | {f.n} | {_fmt(f, f.ceiling)}"
                  f"{' (' + f.ceiling_n + ')' if f.ceiling is not None and f.ceiling_n else ''} |" for f in figs]
        evaluated = _get(report, "caption_set", "data")
        if isinstance(evaluated, dict) and evaluated.get("sha256") not in (None, "unknown"):
            lines += ["", f"Evaluated on the captions `{evaluated.get('archive')}` (sha256 `{evaluated['sha256']}`)."]
        lines += [""]

    # Intended use and limits.
    lines += ["## Intended use and limits", "",
              "- For research, teaching and demonstrations of text-conditional image generation: small "
              f"{size}×{size} pictures of flowers from short English descriptions in the style of the training "
              "captions (colours, petal shapes, centres).",
              "- The images are not photographs and show no real plant: do not use them to identify a species, "
              "or as evidence of what a plant looks like.",
              _unseen_limit(report),
              "- It knows only what the dataset shows: 102 flower species, mostly common in the United Kingdom, "
              "photographed from the web; the dataset's own terms of use apply to the images it learned from.",
              "- The same seed gives the same image on a CPU; other hardware or library builds may differ by a "
              "level or so of 255 in a few pixels.",
              ""]
    return "\n".join(lines)


def _unseen_limit(report: dict[str, Any] | None) -> str:
    unseen = _num(_get(report, "class_accuracy", "test", "top1")) if report else None
    seen = _num(_get(report, "class_accuracy", "train", "top1")) if report else None
    if unseen is not None and seen is not None and _get(report, "class_accuracy", "test", "unseen_classes"):
        return (f"- Species it never saw in training are the hardest: the classifier finds the captioned species in "
                f"{100 * unseen:.1f} % of the images for unseen species, against {100 * seen:.1f} % for training "
                "species (top-1, above).")
    return ("- Species it never saw in training are the hardest for a generator like this one; the card has no "
            "measurement of how hard (evaluate it with `flowercli eval`).")


def _count(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else "?"


def _int(x: Any) -> str:
    return f"{int(x):,}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "unknown"


def _plain(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (bool, type(None))) else str(v)


def card_path_for(export: Path) -> Path:
    """Where the card of an export goes: `<name>.md` beside `<name>.safetensors`."""
    return Path(export).with_suffix(".md")


def write_model_card(export: Path, card: Path | None = None) -> Path:
    """Write the card of the exported file `export` (default `card_path_for(export)`); return its path."""
    from flowercli.checkpoint import load_checkpoint
    from flowercli.errors import FlowerError
    from flowercli.fsutil import atomic_write, write_error_text

    export = Path(export)
    state = load_checkpoint(export)
    state.pop("G_ema", None)
    text = model_card(state, export.name, export.stat().st_size)
    card = Path(card) if card is not None else card_path_for(export)
    try:
        atomic_write(card, lambda f: f.write(text.encode("utf-8")))
    except OSError as e:
        raise FlowerError(f"could not write the model card {card}: {write_error_text(e)}; "
                          "the exported model itself was written") from None
    return card
