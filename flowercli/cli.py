"""The command-line interface: parse, call the library, render. Nothing else lives here.

Heavy libraries (torch, transformers, h5py) are imported inside the commands so that
`flowercli --help` stays fast.
"""

from __future__ import annotations

import functools
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import typer
from rich.console import Console

from flowercli import __version__
from flowercli.config import DATA_DIR_ENV, RUNS_DIR_ENV, default_data_dir, default_runs_dir
from flowercli.errors import FlowerError, Interrupted
from flowercli.report import Reporter, Task

app = typer.Typer(
    name="flowercli",
    help="Sentence in, flower out: a text-conditional GAN for Oxford 102 Flowers.\n\n"
    "Pipeline: download -> embed -> train -> generate -> eval. Each stage reads the files the "
    "previous one wrote under the data directory (--data-dir, or $" + DATA_DIR_ENV + ").",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


# ---------------------------------------------------------------------------------------------
# Shared machinery: error handling, output, progress.


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


DataDirOpt = typer.Option(
    None, "--data-dir", "-d", envvar=DATA_DIR_ENV, help="Data directory [default: ./data]."
)
RunsDirOpt = typer.Option(None, "--runs-dir", envvar=RUNS_DIR_ENV, help="Runs directory [default: ./runs].")
QuietOpt = typer.Option(False, "--quiet", "-q", help="Print only results and errors.")
VerboseOpt = typer.Option(False, "--verbose", "-v", help="Print more detail.")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"flowercli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    pass


# --- download ---------------------------------------------------------------------------------
@app.command("download")
@handle_errors
def download_cmd(
    mirror: Optional[str] = typer.Option(
        None, "--mirror", metavar="DIR|URL",
        help="Folder or base URL holding 102flowers.tgz, imagelabels.mat, setid.mat (verified against its "
        "SHA256SUMS when present, else the official md5) [default: the official Oxford VGG site].",
    ),
    captions: Optional[str] = typer.Option(
        None, "--captions", metavar="PATH|URL",
        help="Captions archive (tar, tgz or zip) holding text_c10/ and the class split files "
        "[default: a captions archive in --mirror, else Reed et al. 2016 from Google Drive].",
    ),
    data_dir: Optional[Path] = DataDirOpt,
    force: bool = typer.Option(False, "--force", help="Extract again even when the dataset is complete."),
    as_json: bool = typer.Option(False, "--json", help="Print a summary as one JSON line on stdout."),
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Fetch, verify and unpack Oxford 102 Flowers with its captions into <data>/oxford102/.

    Archives are kept under <data>/.downloads/ (a killed download resumes); the dataset is
    extracted to a temporary folder, validated (8,189 images, labels, captions for every image)
    and renamed into place. Running it again on a complete data directory only verifies.

    \b
    Examples:
      flowercli download
      flowercli download --mirror ../shared/oxford102 --captions ../shared/oxford102/captions_reed.tgz
      flowercli download --mirror https://example.org/flowers102/ --data-dir /data/flowers
      flowercli download --captions ~/Downloads/cvpr2016_flowers.tar.gz --force
      flowercli download --json -q
    """
    from flowercli.config import DataLayout, DownloadConfig
    from flowercli.download import download, summary

    cfg = DownloadConfig(data_dir=data_dir or default_data_dir(), mirror=mirror, captions=captions, force=force)
    manifest = download(cfg, RichReporter(quiet=quiet or as_json, verbose=verbose))
    info = summary(manifest, DataLayout(cfg.data_dir))
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


# --- end download -----------------------------------------------------------------------------

# --- embed ------------------------------------------------------------------------------------
from enum import Enum  # noqa: E402  (kept inside this section: sections are edited independently)

from flowercli.config import EmbedConfig  # noqa: E402  (stdlib only: cheap)

_EMBED = EmbedConfig(data_dir=Path("."))  # the defaults


class _Pooling(str, Enum):
    mean = "mean"
    cls = "cls"


class _VectorDtype(str, Enum):
    float16 = "float16"
    float32 = "float32"


@app.command("embed")
@handle_errors
def embed_cmd(
    encoder: str = typer.Option(
        _EMBED.encoder, "--encoder", "-e",
        help="Hugging Face model id, a local model folder, or 'minilm' (packaged all-MiniLM-L6-v2, 384-d, offline).",
    ),
    pooling: _Pooling = typer.Option(_Pooling(_EMBED.pooling), "--pooling", help="mean: over non-padding tokens; cls: first token."),
    batch_size: int = typer.Option(_EMBED.batch_size, "--batch-size", "-b", min=1, help="Captions per forward pass."),
    device: str = typer.Option(_EMBED.device, "--device", help="auto, cpu, cuda or cuda:N."),
    max_length: int = typer.Option(_EMBED.max_length, "--max-length", min=2, help="Longest caption in tokens; longer ones are cut (warned)."),
    dtype: _VectorDtype = typer.Option(_VectorDtype(_EMBED.dtype), "--dtype", help="Storage precision of the vectors."),
    normalise: bool = typer.Option(_EMBED.normalise, "--normalise", help="L2-normalise each caption vector."),
    data_dir: Optional[Path] = DataDirOpt,
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON line."),
) -> None:
    """Embed every caption with a text encoder into <data>/embeddings/<encoder>.h5.

    Reads the dataset `flowercli download` wrote, runs the encoder over the ten captions of each
    image (each distinct caption once, batches sorted by length) and writes one HDF5 file per
    encoder: captions, vectors (N x 10 x D), labels, splits, and how they were made.

    \b
    Examples:
      flowercli embed --encoder minilm --data-dir data
      flowercli embed                                   # roberta-large (1024-d); needs the weights
      flowercli embed --encoder ./models/my-bert --pooling cls --device cuda
      flowercli embed --encoder minilm --json -q
    """
    from flowercli.data import read_embeddings_attrs
    from flowercli.embed import embed

    cfg = EmbedConfig(
        data_dir=data_dir or default_data_dir(), encoder=encoder, pooling=pooling.value, batch_size=batch_size,
        device=device, max_length=max_length, dtype=dtype.value, normalise=normalise,
    )
    path = embed(cfg, RichReporter(quiet=quiet or as_json, verbose=verbose))
    if as_json:
        attrs = read_embeddings_attrs(path)
        keys = ("encoder", "pooling", "dim", "max_length", "dtype", "n_images", "n_distinct_captions",
                "n_truncated", "embed_seconds", "device")
        emit_json({"path": str(path), **{k: attrs.get(k) for k in keys}})
    else:
        typer.echo(str(path))


# --- end embed --------------------------------------------------------------------------------

# --- train ------------------------------------------------------------------------------------
@app.command()
@handle_errors
def train(
    data_dir: Optional[Path] = DataDirOpt,
    runs_dir: Optional[Path] = RunsDirOpt,
    run: Optional[str] = typer.Option(None, "--run", "--name", help="Run name (a folder under the runs dir) [default: a timestamp]. "
                                      "Under torchrun write --name: torchrun takes --run for its own --run-path."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run from its newest readable checkpoint; "
                                "start it if it has none yet (one command line for start and restarts)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", "-e", min=1, help="Epochs in total (also when resuming) [default: 1]."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", min=0, help="Stop after this many steps in total."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=2, help="Images per step [default: 64]."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Generator learning rate [recipe default]."),
    lr_d: Optional[float] = typer.Option(None, "--lr-d", help="Discriminator learning rate (TTUR) [recipe default]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed: the same seed repeats a CPU run exactly [default: 0]."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu or cuda [default: auto]."),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto, fp32 or bf16 autocast [default: auto]."),
    threads: Optional[int] = typer.Option(None, "--threads", min=0, help="CPU threads for torch (0 = one per core) [default: 0]."),
    recipe: str = typer.Option("modern", "--recipe", help="modern (default) or reference (the original design)."),
    split: Optional[str] = typer.Option(None, "--split", help="classes, images, all or auto (classes when split files exist)."),
    embeddings: Optional[Path] = typer.Option(None, "--embeddings", help="HDF5 from `flowercli embed` [default: newest in <data>/embeddings]."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="Pick <data>/embeddings/<encoder>.h5 (e.g. minilm)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Training resolution, a power of two [default: 64]."),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", min=1, help="Steps between checkpoints (and every epoch end) [default: 500]."),
    keep: Optional[int] = typer.Option(None, "--keep", min=1, help="Step checkpoints to keep [default: 3]."),
    sample_every: Optional[int] = typer.Option(None, "--sample-every", min=1, help="Epochs between sample grids [default: 1]."),
    cond_aug: Optional[bool] = typer.Option(None, "--cond-aug/--no-cond-aug", help="Conditioning augmentation + KL term."),
    loss: Optional[str] = typer.Option(None, "--loss", help="bce or hinge."),
    spectral_norm: Optional[bool] = typer.Option(None, "--spectral-norm/--no-spectral-norm", help="Spectral normalisation in D."),
    d_head: Optional[str] = typer.Option(None, "--d-head", help="aux (class head), projection, both or none."),
    aux_weight: Optional[float] = typer.Option(None, "--aux-weight", help="Weight of the class head's cross-entropy (--d-head aux or both) [default: 1]."),
    ma_gp: Optional[float] = typer.Option(None, "--ma-gp", help="Weight of the matching-aware gradient penalty (0 = off)."),
    diffaug: Optional[str] = typer.Option(None, "--diffaug", help='DiffAugment policy, e.g. "color,translation,cutout" ("" = off).'),
    ema: Optional[float] = typer.Option(None, "--ema", help="EMA decay of the generator used for samples (0 = off)."),
    gan_int: Optional[float] = typer.Option(None, "--gan-int", help="Weight of the GAN-INT term on interpolated captions (0 = off)."),
    mode_seek: Optional[float] = typer.Option(None, "--mode-seek", help="Weight of the mode-seeking term that makes G use its noise (0 = off)."),
    contrastive: Optional[float] = typer.Option(None, "--contrastive", help="Weight of the image-caption contrastive term in D and G (0 = off)."),
    cond_bn: Optional[bool] = typer.Option(None, "--cond-bn/--no-cond-bn", help="Text at every generator layer (conditional BatchNorm)."),
    text_proj: Optional[bool] = typer.Option(None, "--text-proj/--no-text-proj", help="Caption projection term in D's logit."),
    g_channels: Optional[int] = typer.Option(None, "--g-channels", min=4, help="Generator width [recipe default: modern 32, reference 64]."),
    d_channels: Optional[int] = typer.Option(None, "--d-channels", min=4, help="Discriminator width [recipe default: modern 32, reference 64]."),
    set_: Optional[List[str]] = typer.Option(None, "--set", metavar="FIELD=VALUE",
                                             help="Set any training field (beta1=0.5) or model field (model.noise_layers=concat), "
                                             "parsed by its type; repeatable; wins over the recipe and the other flags."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Train the text-conditional GAN on the embedded captions.

    Writes <runs>/<run>/ with config.json, log.jsonl, samples/epoch-NNNN.png (fixed prompts and
    noise, so progress is visible) and checkpoints/. Ctrl-C saves a checkpoint and exits (130);
    --resume continues exactly where the run stopped. Under torchrun it trains data-parallel.

    Examples:

        flowercli train --epochs 20 --run first

        flowercli train --resume --run first --epochs 40

        flowercli train --recipe reference --run baseline --epochs 5

        flowercli train --run noisy --set model.noise_layers=concat --set model.mbstd_group=4 --set beta1=0.5

        torchrun --nproc_per_node 2 -m flowercli train --name ddp --epochs 10
    """
    from flowercli import train as train_mod

    given = {k: v for k, v in dict(
        epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr_g=lr, lr_d=lr_d, seed=seed, device=device,
        precision=precision, threads=threads, split=split, image_size=image_size, checkpoint_every=checkpoint_every, keep=keep,
        sample_every=sample_every, cond_aug=cond_aug, loss=loss, spectral_norm=spectral_norm, d_head=d_head,
        aux_weight=aux_weight, ma_gp=ma_gp, diffaug=diffaug, ema=ema, gan_int=gan_int, g_channels=g_channels, d_channels=d_channels,
        cond_bn=cond_bn, text_proj=text_proj, mode_seek=mode_seek, contrastive=contrastive,
    ).items() if v is not None}
    from flowercli.config import parse_set

    try:
        given.update(parse_set(set_ or []))
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="'--set'") from None
    data_dir = data_dir or default_data_dir()
    runs_dir = runs_dir or default_runs_dir()
    if embeddings is None and encoder is not None:
        from flowercli.config import DataLayout

        embeddings = DataLayout(data_dir).embeddings_file(encoder)
    cfg = train_mod.build_config(recipe=recipe, data_dir=data_dir, runs_dir=runs_dir, run=run, resume=resume,
                                 embeddings=embeddings, overrides=given)
    result = train_mod.train(cfg, RichReporter(quiet=quiet, verbose=verbose))
    if not result.is_main:
        return
    if as_json:
        emit_json({"run_dir": str(result.run_dir), "step": result.step, "epoch": result.epoch,
                   "checkpoint": str(result.checkpoint) if result.checkpoint else None,
                   "seconds": round(result.seconds, 2), "images_per_second": round(result.images_per_second, 1)})
    else:
        typer.echo(str(result.checkpoint))


# --- end train --------------------------------------------------------------------------------

# --- generate ---------------------------------------------------------------------------------
@app.command()
@handle_errors
def generate(
    prompts: Optional[List[str]] = typer.Argument(None, help="One or more sentences describing a flower."),
    n: int = typer.Option(16, "-n", "--n", help="Images per prompt."),
    out: Path = typer.Option(Path("out"), "--out", "-o", help="Output folder."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="Checkpoint file or run folder [default: newest run, else the packaged model]."),
    runs_dir: Optional[Path] = RunsDirOpt,
    seed: int = typer.Option(0, "--seed", help="Seed of the first image; image k uses seed + k."),
    prompts_file: Optional[Path] = typer.Option(None, "--prompts-file", help="A text file with one prompt per line."),
    interpolate: Optional[List[str]] = typer.Option(None, "--interpolate", help='Walk between two captions: --interpolate "A" --interpolate "B".'),
    steps: int = typer.Option(8, "--steps", help="Images along an --interpolate walk."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    sample_condition: Optional[bool] = typer.Option(
        None, "--sample-condition/--mean-condition",
        help="With a conditioning-augmentation generator: sample each image's condition from its seed (more "
        "variety per prompt) or use the caption's mean [default: what the run's model.sample_condition says, else mean]."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per image (path, prompt, seed, checkpoint)."),
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Generate flower images from sentences.

    Writes seed0000.png, seed0001.png, ... and grid.png into --out and prints the paths, one per
    line. The prompt is embedded with the encoder the checkpoint was trained with.

    Examples:

        flowercli generate "this flower has yellow petals" -n 16

        flowercli generate "a white flower with a yellow centre" -n 4 --seed 7 --out daisies

        flowercli generate --prompts-file prompts.txt -n 8 --json

        flowercli generate --interpolate "red petals" --interpolate "blue petals" --steps 8

        flowercli generate "a pink flower with many petals" -n 16 --sample-condition
    """
    from flowercli.config import GenerateConfig
    from flowercli.errors import InputError
    from flowercli.generate import generate as run_generate

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
    cfg = GenerateConfig(prompts=tuple(all_prompts), checkpoint=checkpoint, runs_dir=runs_dir or default_runs_dir(),
                         out=out, n=n, seed=seed, device=device, interpolate=pair, steps=steps,
                         sample_condition=sample_condition)
    records = run_generate(cfg, RichReporter(quiet=quiet, verbose=verbose))
    for r in records:
        if as_json:
            emit_json(r)
        else:
            typer.echo(r["path"])


# --- end generate -----------------------------------------------------------------------------

# --- eval -------------------------------------------------------------------------------------
def _eval_table(report: dict):
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


def _run_and_checkpoint(run: Optional[str], checkpoint: Optional[Path], runs: Path, ask: str) -> tuple[Path, Path]:
    """(run folder, checkpoint) from --run and/or --checkpoint; `ask` starts the error when neither is given.

    A --checkpoint wins; its run folder is <run>/ for <run>/checkpoints/step-N.pt, the folder
    itself for a run folder, else the file's folder (reports belong there)."""
    from flowercli.checkpoint import find_latest_checkpoint
    from flowercli.errors import InputError

    run_dir: Optional[Path] = None
    if run is not None:
        run_dir = runs / run
        if not run_dir.is_dir():
            raise InputError(f"no run named {run!r} in {runs} (pass --runs-dir, or list the folder)")
    if checkpoint is not None:
        if run_dir is None:
            if checkpoint.is_dir():
                run_dir = checkpoint
            elif checkpoint.parent.name == "checkpoints":
                run_dir = checkpoint.parent.parent
            else:
                run_dir = checkpoint.parent
        return run_dir, checkpoint
    if run_dir is not None:
        return run_dir, find_latest_checkpoint(run_dir)
    raise InputError(f"{ask}: --run NAME or --checkpoint PATH")


@app.command("eval")
@handle_errors
def eval_(
    run: Optional[str] = typer.Option(None, "--run", "-r", help="Run name under --runs-dir; its newest checkpoint is evaluated."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="A checkpoint file or run folder (overrides the run's newest)."),
    runs_dir: Optional[Path] = RunsDirOpt,
    data_dir: Optional[Path] = DataDirOpt,
    n: int = typer.Option(2048, "-n", "--n", help="Generated images for FID and class accuracy."),
    seed: int = typer.Option(0, "--seed", help="Fixes the caption order and the noise (image i uses seed + i)."),
    split: str = typer.Option("test", "--split", help="test (held-out: unseen classes of a 'classes' run) or train."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Batch size for generation and Inception (does not change results)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    inception: Optional[Path] = typer.Option(None, "--inception", help="TorchScript FID Inception file [default: $FLOWERCLI_INCEPTION, the offline wheel, else download]."),
    sample_condition: Optional[bool] = typer.Option(
        None, "--sample-condition/--mean-condition",
        help="Sample each image's condition from its seed, or use the caption's mean [default: the run's "
        "model.sample_condition, else mean]; the report says which."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object on stdout instead of the table."),
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Evaluate a trained generator: FID, class accuracy, colour agreement, diversity, with real-data ceilings.

    Follows the protocol in docs/EVALUATION.md: --n images from the captions of the run's held-out
    split (fixed order and seeds), against the real images of that split; the same command gives
    the same numbers. The table goes to stdout (progress to stderr); report.json and samples.png
    are written to <run>/eval/. The first call also computes and caches the real images'
    Inception features under <data>/cache/eval/ (minutes on a CPU); later calls reuse them.

    Examples:

        flowercli eval --run my-run

        flowercli eval --run my-run -n 4096 --seed 1 --json > report.json

        flowercli eval --checkpoint runs/my-run/checkpoints/step-0010000.pt --split train

        flowercli eval --run my-run --sample-condition
    """
    from flowercli.config import EvalConfig
    from flowercli.generate import load_generator
    from flowercli.metrics.evaluate import evaluate

    if split not in ("test", "train"):
        raise typer.BadParameter(f"{split!r} is not one of test, train", param_hint="--split")
    runs = runs_dir or default_runs_dir()
    run_dir, ckpt = _run_and_checkpoint(run, checkpoint, runs, "say which model to evaluate")
    reporter = RichReporter(quiet=quiet, verbose=verbose)
    generator = load_generator(ckpt, device, runs, sample_condition=sample_condition)
    reporter.debug(f"checkpoint {generator.checkpoint}")
    cfg = EvalConfig(data_dir=data_dir, out_dir=run_dir / "eval", n=n, seed=seed, split=split,
                     batch_size=batch_size, device=device, inception=inception)
    report = evaluate(cfg, generator, reporter)
    if as_json:
        emit_json(report)
    else:
        Console(highlight=False, soft_wrap=True).print(_eval_table(report))
        reporter.info(f"Report: {run_dir / 'eval' / 'report.json'}; samples: {run_dir / 'eval' / 'samples.png'}")


# --- end eval ---------------------------------------------------------------------------------

# --- export -----------------------------------------------------------------------------------
@app.command()
@handle_errors
def export(
    out: Path = typer.Argument(..., help="The file to write, e.g. my-flowers.pt."),
    run: Optional[str] = typer.Option(None, "--run", "-r", help="Run name under --runs-dir; its newest checkpoint is exported."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", "-c", help="A checkpoint file (overrides --run)."),
    runs_dir: Optional[Path] = RunsDirOpt,
    fp32: bool = typer.Option(False, "--fp32", help="Keep float32 weights (default: float16, half the size)."),
    as_json: bool = typer.Option(False, "--json", help="Print path, size, source checkpoint and whether an eval report was included, as JSON."),
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Write a small file holding only what `generate` and `eval` need: the EMA generator.

    A training checkpoint also carries the discriminator and optimiser state (about 25 times the
    size). The exported file works everywhere a checkpoint does (--checkpoint); it records the
    encoder, the training config and, when <run>/eval/report.json belongs to that checkpoint,
    its evaluation figures. It cannot be resumed.

    Examples:

        flowercli export my-flowers.pt --run my-run

        flowercli generate "pink petals" --checkpoint my-flowers.pt
    """
    import json as _json

    from flowercli.checkpoint import export_generator

    # --checkpoint overrides --run here (the run is not even looked up).
    run_dir, checkpoint = _run_and_checkpoint(None if checkpoint else run, checkpoint, runs_dir or default_runs_dir(),
                                              "say what to export")
    meta = {}
    report_path = run_dir / "eval" / "report.json"
    if report_path.is_file():
        try:
            report = _json.loads(report_path.read_text())
        except (OSError, ValueError):
            report = None
        if report and Path(str(report.get("run", {}).get("checkpoint", ""))).name == checkpoint.name:
            meta["eval"] = report
    path = export_generator(checkpoint, out, meta, half=not fp32)
    size = path.stat().st_size
    RichReporter(quiet=quiet, verbose=verbose).info(
        f"Exported {checkpoint} ({size / 2**20:.1f} MiB{', with its eval report' if 'eval' in meta else ''})")
    if as_json:
        emit_json({"path": str(path), "bytes": size, "checkpoint": str(checkpoint), "eval": "eval" in meta})
    else:
        typer.echo(str(path))


# --- end export -------------------------------------------------------------------------------


def main() -> None:
    app()
