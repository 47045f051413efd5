"""The command-line interface: parse, call the library, show the result (clioutput.py). Nothing else
lives here: the configs that need more than the options' values are built in cliutil.py.

Heavy libraries (torch, transformers, h5py) are imported inside the commands so that
`flowercli --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import typer

from flowercli import __version__, clioutput
from flowercli.cliutil import (
    DataDirOpt,
    QuietOpt,
    RichReporter,
    RunsDirOpt,
    VerboseOpt,
    eval_report_for,
    generate_config,
    handle_errors,
    train_config,
    usage_error,
)
from flowercli.cliutil import run_and_checkpoint as _run_and_checkpoint  # the name the commands use
from flowercli.config import DATA_DIR_ENV, default_data_dir, default_runs_dir

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
from flowercli.config import DownloadConfig  # noqa: E402  (stdlib only: cheap)


@app.command("download")
@handle_errors
def download_cmd(
    mirror: str | None = typer.Option(
        None, "--mirror", metavar="DIR|URL",
        help="Folder or base URL holding 102flowers.tgz, imagelabels.mat, setid.mat (verified against its "
        "SHA256SUMS when present, else the official md5) [default: the official Oxford VGG site].",
    ),
    captions: str | None = typer.Option(
        None, "--captions", metavar="PATH|URL",
        help="Captions archive (tar, tgz or zip) holding text_c10/ and the class split files "
        "[default: a captions archive in --mirror, else Reed et al. 2016 from Google Drive].",
    ),
    data_dir: Path | None = DataDirOpt,
    force: bool = typer.Option(DownloadConfig.force, "--force",
                               help="Extract again even when the dataset is complete."),
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
    from flowercli.config import DataLayout
    from flowercli.download import download, summary

    cfg = DownloadConfig(data_dir=data_dir or default_data_dir(), mirror=mirror, captions=captions, force=force)
    manifest = download(cfg, RichReporter(quiet=quiet or as_json, verbose=verbose))
    clioutput.show_download(summary(manifest, DataLayout(cfg.data_dir)), as_json)


# --- end download -----------------------------------------------------------------------------

# --- embed ------------------------------------------------------------------------------------
from flowercli.cliutil import Pooling, VectorDtype  # noqa: E402  (kept inside this section: sections are edited independently)
from flowercli.config import EmbedConfig  # noqa: E402  (stdlib only: cheap)

_EMBED = EmbedConfig(data_dir=Path("."))  # the defaults


@app.command("embed")
@handle_errors
def embed_cmd(
    encoder: str = typer.Option(
        _EMBED.encoder, "--encoder", "-e",
        help="Hugging Face model id, a local model folder, or 'minilm' (packaged all-MiniLM-L6-v2, 384-d, offline).",
    ),
    pooling: Pooling = typer.Option(Pooling(_EMBED.pooling), "--pooling", help="mean: over non-padding tokens; cls: first token."),
    batch_size: int = typer.Option(_EMBED.batch_size, "--batch-size", "-b", min=1, help="Captions per forward pass."),
    device: str = typer.Option(_EMBED.device, "--device", help="auto, cpu, cuda or cuda:N."),
    max_length: int = typer.Option(_EMBED.max_length, "--max-length", min=2, help="Longest caption in tokens; longer ones are cut (warned)."),
    dtype: VectorDtype = typer.Option(VectorDtype(_EMBED.dtype), "--dtype", help="Storage precision of the vectors."),
    normalise: bool = typer.Option(_EMBED.normalise, "--normalise", help="L2-normalise each caption vector."),
    data_dir: Path | None = DataDirOpt,
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
    from flowercli.embed import embed

    cfg = EmbedConfig(
        data_dir=data_dir or default_data_dir(), encoder=encoder, pooling=pooling.value, batch_size=batch_size,
        device=device, max_length=max_length, dtype=dtype.value, normalise=normalise,
    )
    clioutput.show_embed(embed(cfg, RichReporter(quiet=quiet or as_json, verbose=verbose)), as_json)


# --- end embed --------------------------------------------------------------------------------

# --- train ------------------------------------------------------------------------------------
from flowercli.config import TrainConfig, settable_fields  # noqa: E402  (stdlib only: cheap)

_TRAIN = TrainConfig()  # the defaults; None below means "not given": the recipe's, or the run's on --resume


@app.command(
    # The flags that moved behind --set (cliutil.MOVED_TRAIN_FLAGS) reach the command as extra words.
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog="--set fields: " + ", ".join(settable_fields()) + ".",
)
@handle_errors
def train(
    ctx: typer.Context,
    data_dir: Path | None = DataDirOpt,
    runs_dir: Path | None = RunsDirOpt,
    run: str | None = typer.Option(None, "--run", "--name", help="Run name (a folder under the runs dir) "
                                      "[default: a timestamp]. Under torchrun write --name: torchrun takes --run."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run from its newest readable checkpoint; "
                                "start it if it has none yet (one command line for start and restarts)."),
    recipe: str = typer.Option(_TRAIN.recipe, "--recipe", help="modern or reference (the original design)."),
    embeddings: Path | None = typer.Option(
        None, "--embeddings", help="HDF5 from `flowercli embed` [default: newest in <data>/embeddings]."),
    encoder: str | None = typer.Option(None, "--encoder", help="Pick <data>/embeddings/<encoder>.h5 (e.g. minilm)."),
    split: str | None = typer.Option(None, "--split", help="classes, images, all or auto (classes when split "
                                        f"files exist) [default: {_TRAIN.split}]."),
    epochs: int | None = typer.Option(None, "--epochs", "-e", min=1,
                                         help=f"Epochs in total (also when resuming) [default: {_TRAIN.epochs}]."),
    max_steps: int | None = typer.Option(None, "--max-steps", min=0, help="Stop after this many steps in total."),
    batch_size: int | None = typer.Option(None, "--batch-size", "-b", min=2,
                                             help=f"Images per step [default: {_TRAIN.batch_size}]."),
    lr: float | None = typer.Option(None, "--lr", help="Generator learning rate [default: the recipe's]."),
    lr_d: float | None = typer.Option(None, "--lr-d", help="Discriminator learning rate [default: the recipe's]."),
    seed: int | None = typer.Option(None, "--seed", min=0,
                                       help=f"The same seed repeats a CPU run exactly [default: {_TRAIN.seed}]."),
    device: str | None = typer.Option(None, "--device",
                                         help=f"auto, cpu, cuda or cuda:N [default: {_TRAIN.device}]."),
    precision: str | None = typer.Option(None, "--precision",
                                            help=f"auto, fp32 or bf16 autocast [default: {_TRAIN.precision}]."),
    threads: int | None = typer.Option(None, "--threads", min=0,
                                          help=f"CPU threads for torch, 0 = one per core [default: {_TRAIN.threads}]."),
    checkpoint_every: int | None = typer.Option(None, "--checkpoint-every", min=1, help="Steps between checkpoints "
                                                   f"(and every epoch end) [default: {_TRAIN.checkpoint_every}]."),
    keep: int | None = typer.Option(None, "--keep", min=1, help=f"Step checkpoints kept [default: {_TRAIN.keep}]."),
    eval_every: int | None = typer.Option(
        None, "--eval-every", min=0, metavar="STEPS", help="Quick FID of the EMA generator every STEPS steps and at "
        f"the end ({_TRAIN.quick_eval_n} images of the evaluated split, logged); the best step is kept as "
        "checkpoints/best.pt. 0 = off [default: 0]."),
    tensorboard: bool | None = typer.Option(
        None, "--tensorboard/--no-tensorboard", help="Also write <run>/tensorboard/ for `tensorboard --logdir`: "
        "losses, learning rates, img/s, quick FID, sample grids (needs the tensorboard extra)."),
    set_: list[str] | None = typer.Option(None, "--set", metavar="FIELD=VALUE",
                                             help="Any other training field (beta1=0.5) or model field "
                                             "(model.cond_bn=false), parsed by its type; repeatable; wins over the "
                                             "recipe and the flags. The fields are listed below."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Train the text-conditional GAN on the embedded captions.

    Writes <runs>/<run>/ with config.json, log.jsonl, samples/epoch-NNNN.png (fixed prompts and
    noise, so progress is visible) and checkpoints/. Ctrl-C saves a checkpoint and exits (130);
    --resume continues exactly where the run stopped. Under torchrun it trains data-parallel.
    Every other setting of the recipe and the model is a --set field (TrainConfig, ModelConfig).

    \b
    Examples:
      flowercli train --epochs 20 --run first
      flowercli train --resume --run first --epochs 40
      flowercli train --recipe reference --run baseline --epochs 5
      flowercli train --run wide --set g_channels=64 --set d_channels=64
      flowercli train --run noisy --set model.noise_layers=concat --set model.mbstd_group=4 --set beta1=0.5
      flowercli train --run watched --epochs 100 --eval-every 1000 --tensorboard
      torchrun --nproc_per_node 2 -m flowercli train --name ddp --epochs 10
    """
    from flowercli import train as train_mod

    reporter = RichReporter(quiet=quiet, verbose=verbose)
    flags = dict(epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr_g=lr, lr_d=lr_d, seed=seed,
                 device=device, precision=precision, threads=threads, split=split, checkpoint_every=checkpoint_every,
                 keep=keep, eval_every=eval_every, tensorboard=tensorboard)
    cfg = train_config(ctx, reporter, flags, set_, recipe=recipe, data_dir=data_dir, runs_dir=runs_dir, run=run,
                       resume=resume, embeddings=embeddings, encoder=encoder)
    clioutput.show_train(train_mod.train(cfg, reporter), as_json)


# --- end train --------------------------------------------------------------------------------

# --- generate ---------------------------------------------------------------------------------
from flowercli.config import GenerateConfig  # noqa: E402  (stdlib only: cheap)

_GEN = GenerateConfig()  # the defaults


@app.command()
@handle_errors
def generate(
    prompts: list[str] | None = typer.Argument(None, help="One or more sentences describing a flower."),
    n: int | None = typer.Option(None, "-n", "--n",
                                    help=f"Images per prompt, seeds --seed, --seed + 1, ... [default: {_GEN.n}]."),
    out: Path = typer.Option(_GEN.out, "--out", "-o", help="Output folder."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", "-c", help="Checkpoint file (.pt or .safetensors) or run folder [default: newest run, else the packaged model]."),
    runs_dir: Path | None = RunsDirOpt,
    seed: int | None = typer.Option(None, "--seed",
                                       help=f"Seed of the first image; image k uses seed + k [default: {_GEN.seed}]."),
    seeds: str | None = typer.Option(None, "--seeds", help="The seeds of each prompt's images, e.g. 0-15,42 (ranges inclusive); instead of --seed and -n, which it does not combine with."),
    truncation: float = typer.Option(_GEN.truncation, "--truncation", metavar="PSI", help="Scale every image's noise by PSI toward its mean (0 < PSI <= 1; 1 = off): less variety, more typical images. With --sample-condition the condition's noise too."),
    prompts_file: Path | None = typer.Option(None, "--prompts-file", help="A text file with one prompt per line."),
    interpolate: list[str] | None = typer.Option(None, "--interpolate", help='Walk between two captions: --interpolate "A" --interpolate "B".'),
    steps: int = typer.Option(_GEN.steps, "--steps", help="Images along an --interpolate walk."),
    device: str = typer.Option(_GEN.device, "--device", help="auto, cpu, cuda or cuda:N."),
    sample_condition: bool | None = typer.Option(
        None, "--sample-condition/--mean-condition",
        help="With a conditioning-augmentation generator: sample each image's condition from its seed (more "
        "variety per prompt) or use the caption's mean [default: what the run's model.sample_condition says, else mean]."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per image (path, prompt, seed, truncation, checkpoint)."),
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Generate flower images from sentences.

    Writes seed0000.png, seed0001.png, ... and grid.png into --out and prints the paths, one per
    line. The prompt is embedded with the encoder the checkpoint was trained with. An image
    depends only on its prompt, seed and --truncation: seed 5 gives the same image with -n 8 as
    with --seeds 5.

    Examples:

        flowercli generate "this flower has yellow petals" -n 16

        flowercli generate "a white flower with a yellow centre" -n 4 --seed 7 --out daisies

        flowercli generate --prompts-file prompts.txt -n 8 --json

        flowercli generate --interpolate "red petals" --interpolate "blue petals" --steps 8

        flowercli generate "a pink flower with many petals" -n 16 --sample-condition

        flowercli generate "a red flower" --seeds 0-7,42 --truncation 0.7
    """
    from flowercli.generate import generate as run_generate

    cfg = generate_config(prompts, prompts_file, interpolate, seeds, n=n, seed=seed, truncation=truncation,
                          checkpoint=checkpoint, runs_dir=runs_dir or default_runs_dir(), out=out, device=device,
                          steps=steps, sample_condition=sample_condition)
    clioutput.show_generated(run_generate(cfg, RichReporter(quiet=quiet, verbose=verbose)), as_json)


# --- end generate -----------------------------------------------------------------------------

# --- eval -------------------------------------------------------------------------------------
from flowercli.config import EvalConfig  # noqa: E402  (stdlib only: cheap)

_EVAL = EvalConfig()  # the defaults: the protocol of docs/EVALUATION.md


@app.command("eval")
@handle_errors
def eval_(
    run: str | None = typer.Option(None, "--run", "-r", help="Run name under --runs-dir; its newest checkpoint is evaluated."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", "-c", help="A checkpoint file or run folder (overrides the run's newest)."),
    runs_dir: Path | None = RunsDirOpt,
    data_dir: Path | None = DataDirOpt,
    n: int = typer.Option(_EVAL.n, "-n", "--n", help="Generated images for FID and class accuracy."),
    seed: int = typer.Option(_EVAL.seed, "--seed", help="Fixes the caption order and the noise (image i uses seed + i)."),
    split: str = typer.Option(_EVAL.split, "--split", help="test (held-out: unseen classes of a 'classes' run) or train."),
    batch_size: int = typer.Option(_EVAL.batch_size, "--batch-size", "-b", help="Batch size for generation and Inception (does not change results)."),
    device: str = typer.Option(_EVAL.device, "--device", help="auto, cpu, cuda or cuda:N."),
    inception: Path | None = typer.Option(None, "--inception", help="TorchScript FID Inception file [default: $FLOWERCLI_INCEPTION, the offline wheel, else download]."),
    sample_condition: bool | None = typer.Option(
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

    \b
    Examples:
      flowercli eval --run my-run
      flowercli eval --run my-run -n 4096 --seed 1 --json > report.json
      flowercli eval --checkpoint runs/my-run/checkpoints/step-0010000.pt --split train
      flowercli eval --run my-run --sample-condition
    """
    from flowercli.generate import load_generator
    from flowercli.metrics.evaluate import evaluate

    if split not in ("test", "train"):
        raise typer.BadParameter(f"{split!r} is not one of test, train", param_hint="--split")
    runs = runs_dir or default_runs_dir()
    run_dir, ckpt = _run_and_checkpoint(run, checkpoint, runs, "say which model to evaluate")
    reporter = RichReporter(quiet=quiet, verbose=verbose)
    generator = load_generator(ckpt, device, runs, sample_condition=sample_condition)
    reporter.debug(f"checkpoint {generator.checkpoint}")
    out_dir = run_dir / "eval"
    cfg = EvalConfig(data_dir=data_dir, out_dir=out_dir, n=n, seed=seed, split=split,
                     batch_size=batch_size, device=device, inception=inception)
    clioutput.show_eval(evaluate(cfg, generator, reporter), as_json, reporter, out_dir)


# --- end eval ---------------------------------------------------------------------------------

# --- export -----------------------------------------------------------------------------------
@app.command()
@handle_errors
def export(
    out: Path = typer.Argument(..., help="The file to write; its suffix picks the format: NAME.safetensors (weights, metadata as JSON strings; loads without pickle) or NAME.pt (a torch file)."),
    run: str | None = typer.Option(None, "--run", "-r", help="Run name under --runs-dir; its newest checkpoint is exported."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", "-c", help="A checkpoint file (overrides --run)."),
    runs_dir: Path | None = RunsDirOpt,
    fp32: bool = typer.Option(False, "--fp32", help="Keep float32 weights (default: float16, half the size)."),
    card: bool = typer.Option(True, "--card/--no-card", help="Write the model card NAME.md beside the file (Hugging Face layout; upload it as README.md)."),
    as_json: bool = typer.Option(False, "--json", help="Print path, size, card, source checkpoint and whether an eval report was included, as JSON."),
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Write a small file holding only what `generate` and `eval` need: the EMA generator.

    A training checkpoint also carries the discriminator and optimiser state (about 25 times the
    size). The exported file works everywhere a checkpoint does (--checkpoint); it records the
    encoder, the training config and, when <run>/eval/report.json belongs to that checkpoint,
    its evaluation figures; paths of this machine are reduced to file names. It cannot be
    resumed. Beside it goes its model card, NAME.md: what the model is, its training data and
    recipe, budget, evaluation figures with their ceilings, intended use and limits.

    Examples:

        flowercli export my-flowers.safetensors --run my-run

        flowercli export my-flowers.pt --run my-run --no-card

        flowercli generate "pink petals" --checkpoint my-flowers.safetensors
    """
    from flowercli.checkpoint import export_format, export_generator
    from flowercli.errors import InputError
    from flowercli.modelcard import write_model_card

    with usage_error("'OUT'", InputError):
        export_format(out)
    # --checkpoint overrides --run here (the run is not even looked up).
    run_dir, checkpoint = _run_and_checkpoint(None if checkpoint else run, checkpoint, runs_dir or default_runs_dir(),
                                              "say what to export")
    report = eval_report_for(run_dir, checkpoint)
    path = export_generator(checkpoint, out, {"eval": report} if report else {}, half=not fp32)
    clioutput.show_export(path, write_model_card(path) if card else None, checkpoint, report is not None, as_json,
                          RichReporter(quiet=quiet, verbose=verbose))


# --- end export -------------------------------------------------------------------------------

# --- report -----------------------------------------------------------------------------------
@app.command("report")
@handle_errors
def report_cmd(
    run: str = typer.Argument(..., help="Run name under --runs-dir, or the path of a run folder."),
    out: Path | None = typer.Option(None, "--out", "-o", help="The PNG to write [default: <run>/report.png]."),
    runs_dir: Path | None = RunsDirOpt,
    as_json: bool = typer.Option(False, "--json", help="Print the numbers as one JSON object instead of the summary."),
    quiet: bool = QuietOpt,
    verbose: bool = VerboseOpt,
) -> None:
    """Summarise a training run and draw it: loss curves, quick FID, img/s and the newest samples in one PNG.

    Reads the run's log.jsonl, config.json, checkpoints/ and samples/ (nothing is loaded or
    trained, so it can watch a run while it trains) and prints steps, epochs, wall-clock time,
    latest losses, the latest and best checkpoint and the caption set. The PNG needs matplotlib
    (pip install 'flowercli[plots]'); without it the summary is still printed.

    Examples:

        flowercli report my-run

        flowercli report runs/my-run --out my-run.png

        flowercli report my-run --json | jq .quick_fid.best

        watch -n 60 flowercli report my-run
    """
    from flowercli.config import ReportConfig
    from flowercli.runreport import make_report

    cfg = ReportConfig(run=run, runs_dir=runs_dir or default_runs_dir(), out=out)
    clioutput.show_report(make_report(cfg, RichReporter(quiet=quiet, verbose=verbose)), as_json)


# --- end report -------------------------------------------------------------------------------


def main() -> None:
    app()
