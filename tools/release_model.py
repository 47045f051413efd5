"""Release tool: the packaged generator as flowercli/pretrained/{generator.safetensors, generator.json, README.md}.

From a training checkpoint or an export (a `.pt` export converts without changing a weight), it
writes the safetensors file with `flowercli export`'s own function, adding in its metadata what
the file cannot know (how long training took, on which machine, and, for checkpoints older than
the caption-set record, which captions they were trained on); then generator.json (a short
summary) and README.md (the model card, `flowercli.modelcard`) from that file, so all three say
the same. It refuses to finish while any output holds an absolute path.

    python tools/release_model.py flowercli/pretrained/generator.safetensors \
        --facts flowercli/pretrained/generator.json --out flowercli/pretrained

The caption set comes from the checkpoint (its embeddings' record, or one an earlier release put
in its metadata); only where neither exists must --captions-archive and --captions-sha256 name it,
and the tool stops until they do. --captions-note adds how it was established to the card.
--facts takes the training facts of an earlier generator.json ("training": device, cpu_seconds,
wall_seconds; "data": dataset); --cpu-seconds, --wall-seconds and --device give or override them.
Afterwards check that `flowercli generate "this flower has yellow petals" -n 16` (the README's
first command, with no run) writes the same grid.png bytes as before the release.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def absolute_paths(obj, where: str = "") -> list[str]:
    """Every string in `obj` (nested dicts and lists) that is an absolute path, as 'where: value'."""
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in absolute_paths(v, f"{where}.{k}")]
    if isinstance(obj, list):
        return [x for i, v in enumerate(obj) for x in absolute_paths(v, f"{where}[{i}]")]
    if isinstance(obj, str) and (obj.startswith(("/", "~")) or (len(obj) > 2 and obj[1:3] in (":\\", ":/"))):
        return [f"{where}: {obj}"]
    return []


def summary(state: dict, file_name: str, dataset: str | None) -> dict:
    """generator.json: what the packaged file is, in a few lines (no paths)."""
    cfg, meta = state["config"], state.get("meta", {})
    report = meta.get("eval") or {}
    out = {"file": file_name, "what": f"EMA generator, {meta.get('dtype', 'float16')} weights",
           "step": state["step"], "recipe": cfg.get("recipe"), "model": cfg["model"],
           "learning_rates": {"g": cfg.get("lr_g"), "d": cfg.get("lr_d")},
           "encoder": state.get("encoder"),
           "data": {**({"dataset": dataset} if dataset else {}), "split": (state.get("data") or {}).get("split"),
                    "train_classes": cfg["model"].get("n_classes"), "caption_set": meta.get("caption_set")},
           "training": {**meta.get("training", {}), "steps": state["step"], "batch_size": cfg.get("batch_size")}}
    if report:
        acc = report.get("class_accuracy", {})
        out["eval"] = {"protocol": "flowercli eval defaults (docs/EVALUATION.md), unseen test classes",
                       "fid": report["fid"]["value"], "fid_n_generated": report["fid"]["n_generated"],
                       "fid_n_real": report["fid"]["n_real"], "fid_ceiling": report["fid"]["ceiling"]["value"],
                       "class_top1_unseen": acc.get("test", {}).get("top1"),
                       "class_top5_unseen": acc.get("test", {}).get("top5"),
                       "class_top1_train_classes": acc.get("train", {}).get("top1"),
                       "colour_agreement": report.get("colour", {}).get("agreement")}
    return out


def release_caption_set(state: dict, archive: str | None, sha256: str | None, note: str | None,
                        source: Path) -> dict:
    """The caption set of the release: the one the checkpoint records, the options filling or overriding it.

    Checkpoints copy the embeddings file's record into "encoder"; an earlier release may have put one
    in meta (`flowercli.modelcard.caption_set` reads either). The embeddings' record is what eval and
    the model card go by, so an option that contradicts it is refused rather than written beside it.
    """
    from flowercli.modelcard import caption_set

    enc = state.get("encoder") or {}
    recorded = caption_set(state) or {}
    if enc.get("captions_sha256"):
        for option, given, key in (("--captions-sha256", sha256, "sha256"), ("--captions-archive", archive, "archive")):
            if given and given != recorded[key]:
                sys.exit(f"{option} {given} contradicts {source}, trained on the caption set {recorded['archive']} "
                         f"(sha256 {recorded['sha256']}) as its embeddings record; leave {option} out")
    # Another sha256 than an earlier release recorded is another set: nothing of that record is kept.
    base = recorded if not sha256 or sha256 == recorded.get("sha256") else {}
    caps = {**base, **({"archive": archive} if archive else {}), **({"sha256": sha256} if sha256 else {}),
            **({"note": note} if note else {})}
    if not caps.get("sha256"):
        sys.exit(f"{source} does not record which caption set it was trained on (embeddings made before the "
                 "record); name it with --captions-archive NAME --captions-sha256 HEX")
    return {"archive": caps.get("archive") or "unknown", "sha256": caps["sha256"],
            **({"note": caps["note"]} if caps.get("note") else {})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="a training checkpoint or an exported .pt/.safetensors")
    p.add_argument("--out", type=Path, default=Path("flowercli/pretrained"))
    p.add_argument("--name", default="generator", help="file name without suffix [default: generator]")
    p.add_argument("--facts", type=Path, help="an earlier generator.json to take the training facts from")
    p.add_argument("--cpu-seconds", type=float)
    p.add_argument("--wall-seconds", type=float)
    p.add_argument("--device", help="the training machine in words")
    p.add_argument("--captions-archive", help="the caption set's archive name [default: the checkpoint's record]")
    p.add_argument("--captions-sha256", help="the caption set's sha256 [default: the checkpoint's record]")
    p.add_argument("--captions-note", help="how the caption set was established, said in the card")
    p.add_argument("--report", type=Path, help="an eval report.json of the source checkpoint (default: the one inside)")
    args = p.parse_args()

    import torch

    from flowercli.checkpoint import export_generator, load_checkpoint
    from flowercli.modelcard import write_model_card

    facts = json.loads(args.facts.read_text()) if args.facts else {}
    training = {k: v for k, v in (facts.get("training") or {}).items()
                if k in ("device", "cpu_seconds", "wall_seconds")}
    for key, value in (("cpu_seconds", args.cpu_seconds), ("wall_seconds", args.wall_seconds), ("device", args.device)):
        if value is not None:
            training[key] = value
    meta: dict = {"training": training} if training else {}
    if args.report:
        meta["eval"] = json.loads(args.report.read_text())

    # Read the source before anything is written: --out may be the folder it lives in.
    source = load_checkpoint(args.source)
    meta["caption_set"] = release_caption_set(source, args.captions_archive, args.captions_sha256, args.captions_note,
                                              args.source)
    half = source.get("meta", {}).get("dtype", "float16") == "float16"
    target = args.out / f"{args.name}.safetensors"
    export_generator(args.source, target, meta, half=half)
    released = load_checkpoint(target)
    changed = [k for k, v in source["G_ema"].items()
               if k not in released["G_ema"] or not torch.equal(v.to(released["G_ema"][k].dtype), released["G_ema"][k])]
    if changed or set(released["G_ema"]) != set(source["G_ema"]):
        sys.exit(f"weights differ from {args.source} after the release: {changed[:5]}")

    state = {k: v for k, v in released.items() if k != "G_ema"}
    json_path = args.out / f"{args.name}.json"
    dataset = (facts.get("data") or {}).get("dataset")
    json_path.write_text(json.dumps(summary(state, target.name, dataset), indent=2) + "\n")
    card = write_model_card(target, args.out / "README.md")
    found = absolute_paths(state) + absolute_paths(json.loads(json_path.read_text()))
    # ...and none of the source's recorded paths anywhere in the bytes written (the card included).
    written = b"".join(path.read_bytes() for path in (target, json_path, card))
    found += [f"{v.split(': ', 1)[1]} (from the source's {v.split(': ', 1)[0]})" for v in absolute_paths(
        {k: v for k, v in source.items() if k != "G_ema"}) if v.split(": ", 1)[1].encode() in written]
    # The encoder id is kept as recorded (generate loads it): a packaged model must name a packaged encoder.
    if found:
        sys.exit("absolute paths in the release:\n  " + "\n  ".join(found))
    for path in (target, json_path, card):
        print(f"{path}  {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
