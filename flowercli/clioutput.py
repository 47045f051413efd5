"""How each command of cli.py shows its result: with --json one JSON document per line on stdout,
else what a person reads (paths and tables on stdout, summaries beside the progress on stderr).
The --json objects are a stable interface for scripts: their keys do not change with the text.

Like cli.py it imports no heavy library at module level: `flowercli --help` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console, JustifyMethod

from flowercli.cliutil import emit_json
from flowercli.report import Reporter

if TYPE_CHECKING:
    from flowercli.train import TrainResult

# The attributes of an embeddings file that `embed --json` prints beside its path.
EMBED_JSON_KEYS = ("encoder", "pooling", "dim", "max_length", "dtype", "n_images", "n_distinct_captions",
                   "n_truncated", "embed_seconds", "device")


def show_download(info: dict[str, Any], as_json: bool) -> None:
    """download.summary's dict; as text two lines on stderr, so stdout stays empty for scripts."""
    if as_json:
        emit_json(info)
        return
    fewer = info["images_with_fewer_than_10_captions"]
    done = "already complete, verified" if info["status"] == "verified" else "installed"
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"{info['dataset']}: {info['images']:,} images, {info['classes']} classes, {info['captions']:,} captions"
        f" ({fewer:,} images with fewer than 10) - {done}.\n"
        f"Captions: {info['caption_set']['archive']} (sha256 {str(info['caption_set']['sha256'])[:12]}...); "
        f"class split files: {', '.join(info['split_files']) or 'none'}.", markup=False)


def show_embed(path: Path, as_json: bool) -> None:
    """The embeddings file's path; with --json also how it was made (its HDF5 attributes)."""
    if not as_json:
        typer.echo(str(path))
        return
    from flowercli.embeddings import read_embeddings_attrs  # imports h5py

    attrs = read_embeddings_attrs(path)
    emit_json({"path": str(path), **{k: attrs.get(k) for k in EMBED_JSON_KEYS}})


def show_train(result: TrainResult, as_json: bool) -> None:
    """The run's last checkpoint; with --json where the run stands. Only the main process of a
    torchrun job speaks: the others would print the same result once more each."""
    if not result.is_main:
        return
    if as_json:
        emit_json({"run_dir": str(result.run_dir), "step": result.step, "epoch": result.epoch,
                   "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                   "seconds": round(result.seconds, 2), "images_per_second": round(result.images_per_second, 1)})
    else:
        typer.echo(str(result.checkpoint))


def show_generated(records: Iterable[dict[str, Any]], as_json: bool) -> None:
    """One line per image: its path, or with --json its record (path, prompt, seed, ...)."""
    for r in records:
        if as_json:
            emit_json(r)
        else:
            typer.echo(r["path"])


def show_eval(report: dict[str, Any], as_json: bool, reporter: Reporter, out_dir: Path) -> None:
    """The eval report: the table on stdout and where report.json and samples.png went, or the JSON."""
    if as_json:
        emit_json(report)
        return
    Console(highlight=False, soft_wrap=True).print(eval_table(report))
    reporter.info(f"Report: {out_dir / 'report.json'}; samples: {out_dir / 'samples.png'}")


def show_export(path: Path, card: Path | None, checkpoint: Path, with_eval: bool, as_json: bool,
                reporter: Reporter) -> None:
    """What `export` wrote: a line on stderr with the size, then the file's path or the JSON."""
    size = path.stat().st_size
    reporter.info(f"Exported {checkpoint} ({size / 2**20:.1f} MiB{', with its eval report' if with_eval else ''})"
                  + (f"; model card {card}" if card else ""))
    if as_json:
        emit_json({"path": str(path), "bytes": size, "card": str(card) if card else None,
                   "checkpoint": str(checkpoint), "eval": with_eval})
    else:
        typer.echo(str(path))


def show_report(summary: dict[str, Any], as_json: bool) -> None:
    """`report`'s summary (runreport.make_report): its lines, or the JSON."""
    if as_json:
        emit_json(summary)
        return
    from flowercli.runreport import summary_lines

    for line in summary_lines(summary):
        typer.echo(line)


# ---------------------------------------------------------------------------------------------
# The eval report as a table.


def eval_table(report: dict):
    """The report as a rich table: every number beside its real-data ceiling and the N behind each."""
    from rich import box
    from rich.table import Table

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def num(x):
        return "n/a" if x is None else f"{x:.2f}"

    fid, run, acc, col = report["fid"], report["run"], report["class_accuracy"], report["colour"]
    split = report["protocol"]["split"]
    caps = report.get("caption_set") or {}
    cap_data, cap_gen = caps.get("data") or {}, caps.get("generator") or {}
    table = Table(title=f"flowercli eval: {split} split of a '{run['split_mode']}' run, {run['image_size']}px, "
                        f"step {run.get('step')}, captions {cap_data.get('archive', 'unknown')}",
                  title_justify="left", box=box.SIMPLE_HEAD)
    columns: tuple[tuple[str, JustifyMethod], ...] = (("metric", "left"), ("value", "right"), ("ceiling", "right"),
                                                      ("N gen", "right"), ("N real", "right"))
    for name, justify in columns:
        table.add_column(name, justify=justify)
    unseen = " unseen" if acc.get(split, {}).get("unseen_classes") else ""
    table.add_row(f"FID ({split}{unseen})", num(fid["value"]), num(fid["ceiling"]["value"]),
                  str(fid["n_generated"]), f"{fid['n_real']}; {fid['ceiling']['n_a']}+{fid['ceiling']['n_b']}")
    diversity_rows, diversity_caption = _diversity_rows(report.get("diversity"), num)
    for row in diversity_rows:
        table.add_row(*row)
    for name in ("test", "train"):
        if name not in acc:
            continue
        a = acc[name]
        what = name + (" unseen" if a.get("unseen_classes") else "")
        for k in ("top1", "top5"):
            table.add_row(f"class {k[:3]}-{k[3:]} ({what})", pct(a[k]), pct(a["ceiling"][k]), str(a["n"]),
                          str(a["ceiling"]["n"]))
    table.add_row("colour agreement", pct(col.get("agreement")), pct(col["ceiling"]["agreement"]),
                  str(col.get("n", 0)), f"{col['ceiling']['n_captions']} capt.")
    sn = report.get("species_names") or {}
    if sn.get("skipped"):
        table.add_row("species names", "skipped", "", "0", "")
    for group, what in (("train", "training species"), ("unseen", "unseen species")):
        g = sn.get(group) or {}
        for k in ("top1", "top5") if g.get("classes") else ():
            table.add_row(f"name {k[:3]}-{k[3:]} ({what})", pct(g[k]), pct(g["ceiling"][k]), str(g["n"]),
                          str(g["ceiling"]["n"]))
    clf, inc = acc["classifier"], report["inception"]
    table.caption = (f"Ceilings: FID of two disjoint halves of the real {split} images; the real-image "
                     f"classifier on held-out real images of the same classes ({clf['classes']} classes, overall "
                     f"top-1 {pct(clf['top1'])}); the colour rule on real images vs their own captions. "
                     f"Inception: {inc['origin']}, sha256 {inc['sha256'][:12]}, {inc['precision']}.")
    if sn.get("n"):
        table.caption += (f" Species names: every class's name in {len(sn['templates'])} sentences x "
                          f"{sn['seeds_per_template']} seeds.")

    def caption_set(c: dict) -> str:
        sha = str(c.get("sha256", "unknown"))
        return "unknown" if sha == "unknown" else f"{c.get('archive', 'unknown')} (sha256 {sha[:12]})"

    trained = ("the set the generator was trained on" if caps.get("same")
               else f"the generator was trained on: {caption_set(cap_gen)}")
    table.caption += f" Captions: {caption_set(cap_data)}; {trained}."
    table.caption += diversity_caption
    table.caption_justify = "left"
    return table


def _diversity_rows(div: dict | None, num: Callable) -> tuple[list[tuple[str, ...]], str]:
    """Table rows and a caption sentence for report["diversity"] (none for reports without it)."""
    if not div:
        return [], ""
    c = div["ceiling"]
    rows: list[tuple[str, ...]] = [
        (f"{name} (k={div['k']})", num(div[name]), num(c[name]), str(div["n_generated"]),
         f"{div['n_real']}; {c['n_a']}+{c['n_b']}") for name in ("precision", "recall", "density", "coverage")]
    wp = div["within_prompt"]
    for space in ("features", "pixels") if wp["prompts"] else ():
        s = wp[space]
        # The spread over captions on a row of its own: a wide value column would squeeze the labels.
        rows += [(f"within-prompt ({space})", num(s["mean"]), num(wp["ceiling"]), f"{wp['prompts']}x{wp['seeds']}",
                  f"{wp['real_per_class']['max']}/class"),
                 ("  10th / 90th pct.", f"{num(s['p10'])}/{num(s['p90'])}", "", "", "")]
    return rows, (" Diversity ceilings: precision/recall/density/coverage of one real half against the other; "
                  "within-prompt (mean over captions): the spread among one caption's images over that among "
                  "real images of its class, 1 for real images.")
