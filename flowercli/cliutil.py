"""What the commands of cli.py share: progress and errors on stderr, JSON on stdout, the common
options, run/checkpoint resolution, the `train` flags that moved behind --set, and the eval table.

Like cli.py it imports no heavy library at module level: `flowercli --help` stays fast.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console

from flowercli.config import DATA_DIR_ENV, RUNS_DIR_ENV, TrainConfig, settable_fields
from flowercli.errors import FlowerError, Interrupted
from flowercli.report import Reporter, Task


class RichReporter(Reporter):
    """Renders library progress on stderr: bars on a terminal, plain lines otherwise."""

    def __init__(self, quiet: bool = False, verbose: bool = False, console: Console | None = None):
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.quiet = quiet
        self.verbose = verbose

    def info(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False)

    def debug(self, message: str) -> None:
        if self.verbose and not self.quiet:
            self.console.print(message, markup=False, style="dim")

    def warn(self, message: str) -> None:
        # Warnings show even with --quiet: they are about the result the user gets.
        self.console.print(f"Warning: {message}", markup=False, style="yellow")

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Task]:
        if self.quiet or not self.console.is_terminal:
            yield Task()
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=True,
        ) as progress:
            tid = progress.add_task(description, total=total, info="")

            class _RichTask(Task):
                def advance(self, n: int = 1) -> None:
                    progress.advance(tid, n)

                def update(self, **fields: object) -> None:
                    text = " ".join(
                        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items()
                    )
                    progress.update(tid, info=text)

            yield _RichTask()


def handle_errors(fn: Callable) -> Callable:
    """Turn user-facing errors into one line on stderr and a stable exit code, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FlowerError as e:
            err = Console(stderr=True, highlight=False, soft_wrap=True)
            # A signal-stopped run saved its work: not an error, but still a non-zero exit.
            prefix = "Stopped" if isinstance(e, Interrupted) else "Error"
            err.print(f"{prefix}: {e}", markup=False, style="red")
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            Console(stderr=True).print("Interrupted.", markup=False)
            raise typer.Exit(130) from None

    return wrapper


def emit_json(obj: object) -> None:
    """One JSON document per line on stdout, for scripts."""
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


# Options every command spells the same way. The folders' defaults are TrainConfig's (the
# environment variables win over them, as config.default_data_dir/default_runs_dir say).
DataDirOpt = typer.Option(
    None, "--data-dir", "-d", envvar=DATA_DIR_ENV, help=f"Data directory [default: ./{TrainConfig.data_dir}]."
)
RunsDirOpt = typer.Option(
    None, "--runs-dir", envvar=RUNS_DIR_ENV, help=f"Runs directory [default: ./{TrainConfig.runs_dir}]."
)
QuietOpt = typer.Option(False, "--quiet", "-q", help="Print only results and errors.")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Print more detail.")


def run_and_checkpoint(run: str | None, checkpoint: Path | None, runs: Path, ask: str) -> tuple[Path, Path]:
    """(run folder, checkpoint file) from --run and/or --checkpoint; `ask` starts the error when neither
    is given. checkpoint.resolve_run_checkpoint does it (imported here, not above: it imports torch)."""
    from flowercli.checkpoint import resolve_run_checkpoint

    return resolve_run_checkpoint(run, checkpoint, runs, ask)


# ---------------------------------------------------------------------------------------------
# `train` flags that moved behind --set: experiment switches measured in docs/BENCHMARKS.md and
# not adopted by a recipe, or settings few runs change. They are documented in earlier releases,
# so they still work (hidden from --help, with a warning naming the --set spelling).

MOVED_TRAIN_FLAGS = {
    "--image-size": "model.image_size", "--g-channels": "model.g_channels", "--d-channels": "model.d_channels",
    "--cond-aug": "model.cond_aug", "--cond-bn": "model.cond_bn", "--text-proj": "model.text_proj",
    "--loss": "model.loss", "--spectral-norm": "model.spectral_norm", "--d-head": "model.d_head",
    "--aux-weight": "model.aux_weight", "--ma-gp": "model.ma_gp", "--diffaug": "model.diffaug",
    "--gan-int": "model.gan_int", "--mode-seek": "model.mode_seek", "--contrastive": "model.contrastive",
    "--ema": "ema", "--sample-every": "sample_every",
}


def moved_flags_as_set(ctx: typer.Context, moved: dict[str, str], reporter: Reporter) -> list[str]:
    """The words click left unparsed (ctx.args) -> FIELD=VALUE items for --set, warning once per flag.

    A bool field's flag takes no value and has a --no- form, as the flags had. Anything else
    left over is the usage error click would have raised without the moved flags (ctx.fail: exit 2)."""
    types = settable_fields()
    items: list[str] = []
    words = list(ctx.args)
    while words:
        word = words.pop(0)
        flag, has_value, value = word.partition("=")
        field = moved.get(flag)
        negated = field is None and flag.startswith("--no-") and types.get(moved.get("--" + flag[5:])) is bool
        if negated:
            field = moved["--" + flag[5:]]
        if field is None:
            if not word.startswith("-") or word == "-":
                ctx.fail(f"Got unexpected extra argument ({word})")
            close = difflib.get_close_matches(flag, [o for p in ctx.command.params for o in p.opts], n=1,
                                              cutoff=0.8)
            ctx.fail(f"No such option: {flag}" + (f" (Possible options: {close[0]})" if close else ""))
        if types[field] is bool:
            if has_value:
                ctx.fail(f"Option '{flag}' does not take a value.")
            value = "false" if negated else "true"
        elif not has_value:
            if not words:
                ctx.fail(f"Option '{flag}' requires an argument.")
            value = words.pop(0)
        items.append(f"{field}={value}")
        if os.environ.get("RANK", "0") == "0":  # under torchrun: once, not once per process
            reporter.warn(f"{flag} is deprecated and will be removed; use --set {field}={value}")
    return items


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
    for name, justify in (("metric", "left"), ("value", "right"), ("ceiling", "right"), ("N gen", "right"),
                          ("N real", "right")):
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
    rows = [(f"{name} (k={div['k']})", num(div[name]), num(c[name]), str(div["n_generated"]),
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
