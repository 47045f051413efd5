"""What the commands of cli.py share: progress and errors on stderr, JSON on stdout, the common
options, usage errors, run/checkpoint resolution, and the configs that `train` (with its flags that
moved behind --set) and `generate` build from their options. How results are shown is clioutput.py.

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
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from flowercli.config import (
    DATA_DIR_ENV,
    RUNS_DIR_ENV,
    DataLayout,
    GenerateConfig,
    TrainConfig,
    default_data_dir,
    default_runs_dir,
    parse_set,
    settable_fields,
)
from flowercli.errors import FlowerError, InputError, Interrupted
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


@contextmanager
def usage_error(param_hint: str, *errors: type[Exception]) -> Iterator[None]:
    """`errors` raised inside become click's usage error on `param_hint`: its message, exit 2."""
    try:
        yield
    except errors as e:
        raise typer.BadParameter(str(e), param_hint=param_hint) from None


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

    run_dir, ckpt = resolve_run_checkpoint(run, checkpoint, runs, ask)
    assert run_dir is not None  # only the packaged fallback has no run folder, and with `ask` there is none
    return run_dir, ckpt


def eval_report_for(run_dir: Path, checkpoint: Path) -> dict | None:
    """<run>/eval/report.json where it evaluated this checkpoint (the same file name), else None.

    An unreadable or foreign report is left out, not an error: the export works without it."""
    try:
        report = json.loads((run_dir / "eval" / "report.json").read_text())
    except (OSError, ValueError):
        return None
    run = report.get("run") if isinstance(report, dict) else None
    if isinstance(run, dict) and Path(str(run.get("checkpoint", ""))).name == checkpoint.name:
        return report
    return None


# ---------------------------------------------------------------------------------------------
# `embed`'s choices: Typer lists an Enum's values in --help and refuses any other value (exit 2).


class Pooling(str, Enum):
    mean = "mean"
    cls = "cls"


class VectorDtype(str, Enum):
    float16 = "float16"
    float32 = "float32"


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
        negated = field is None and flag.startswith("--no-") and types.get(moved.get("--" + flag[5:], "")) is bool
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


def train_config(ctx: typer.Context, reporter: Reporter, flags: dict[str, Any], set_items: list[str] | None, *,
                 recipe: str, data_dir: Path | None, runs_dir: Path | None, run: str | None, resume: bool,
                 embeddings: Path | None, encoder: str | None) -> TrainConfig:
    """`train`'s options -> the run's TrainConfig (runconfig.build_config: the recipe, then the overrides).

    `flags` are the training fields of train's own options, None where not given (then the recipe's,
    or the run's on --resume). The moved flags and --set win over them; a bad --set item is a usage
    error (exit 2). --encoder picks <data>/embeddings/<encoder>.h5 unless --embeddings names a file."""
    from flowercli.runconfig import build_config  # imports torch (through losses and models)

    given = {k: v for k, v in flags.items() if v is not None}
    with usage_error("'--set'", ValueError):
        given.update(parse_set(moved_flags_as_set(ctx, MOVED_TRAIN_FLAGS, reporter) + (set_items or [])))
    data_dir = data_dir or default_data_dir()
    if embeddings is None and encoder is not None:
        embeddings = DataLayout(data_dir).embeddings_file(encoder)
    return build_config(recipe=recipe, data_dir=data_dir, runs_dir=runs_dir or default_runs_dir(), run=run,
                        resume=resume, embeddings=embeddings, overrides=given)


# ---------------------------------------------------------------------------------------------
# `generate`'s options.


def generate_config(prompts: list[str] | None, prompts_file: Path | None, interpolate: list[str] | None,
                    seeds: str | None, n: int | None, seed: int | None, truncation: float,
                    **fields: Any) -> GenerateConfig:
    """`generate`'s options -> GenerateConfig; `fields` (checkpoint, out, device, ...) pass unchanged.

    The prompts are the arguments, then the non-blank lines of --prompts-file. --seeds lists every
    image, so it does not combine with -n or --seed (None: not given, GenerateConfig's default). A bad
    --seeds or --truncation is a usage error on that option (exit 2), as Typer's own checks are."""
    from flowercli.generate import check_truncation, parse_seeds  # imports torch

    seed_list = None
    try:
        if seeds is not None:
            if n is not None or seed is not None:
                raise InputError(f"--seeds: not together with {'-n' if n is not None else '--seed'} (--seeds lists "
                                 "every image; --seed S -n N means the seeds S to S+N-1)")
            seed_list = tuple(parse_seeds(seeds))
        check_truncation(truncation)
    except InputError as e:
        raise typer.BadParameter(str(e).removeprefix("--seeds: ").removeprefix("--truncation "),
                                 param_hint="'--truncation'" if "--truncation" in str(e) else "'--seeds'") from None

    all_prompts = list(prompts or [])
    if prompts_file is not None:
        try:
            raw = prompts_file.read_bytes().decode("utf-8")
        except OSError as e:
            raise InputError(f"cannot read --prompts-file {prompts_file}: {e.strerror}; check the path") from None
        except UnicodeDecodeError:
            raise InputError(f"--prompts-file {prompts_file} is not UTF-8 text; save it as UTF-8 "
                             "(e.g. iconv -t UTF-8)") from None
        all_prompts += [line for line in raw.splitlines() if line.strip()]
    pair = None
    if interpolate:
        if len(interpolate) != 2:
            raise InputError("--interpolate takes exactly two captions: --interpolate \"A\" --interpolate \"B\"")
        pair = (interpolate[0], interpolate[1])
    return GenerateConfig(prompts=tuple(all_prompts), n=GenerateConfig.n if n is None else n,
                          seed=GenerateConfig.seed if seed is None else seed, seeds=seed_list, truncation=truncation,
                          interpolate=pair, **fields)
