"""Bad input across every command (issue 7): one table, each row run through the real CLI.

Every row checks the same contract (docs/ARCHITECTURE.md): the exit code (1 for a FlowerError, 2 for a usage
error), exactly one `Error: ...` line on stderr that names the problem and says what to do, no
traceback, and nothing left behind: the temporary folder each row works in (the current
directory too) is compared before and after the command. Rows with odd but valid input (spaces,
unicode, relative paths, a very long prompt) must instead work.

Faults already covered elsewhere are not repeated here: hostile archives, checksums, HTTP faults
(tests/test_download_*.py), empty/negative/huge -n and a missing or hostile checkpoint
(tests/test_generate.py), resume with another encoder or config (tests/test_train.py).
"""

from __future__ import annotations

import re
import shutil
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flowercli.cli import app
from flowercli.config import DATA_DIR_ENV, RUNS_DIR_ENV, DataLayout

runner = CliRunner()
ON_LINUX = pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
TINY = ["--set", "image_size=16", "--set", "g_channels=8", "--set", "d_channels=8",
        "--batch-size", "4", "--max-steps", "1"]
# An error line must tell the user what to do: one of these verbs (or Typer's "Try ... --help").
ADVICE = re.compile(r"\b(run|use|give|pick|choose|pass|add|train|delete|describe|wait|check|make|free|start|"
                    r"move|put|restore|install|fix|remove|try|resume|download|must|needs|save)\b", re.I)


@pytest.fixture(scope="module")
def checkpoint(embedded_dir, tmp_path_factory) -> Path:
    """A tiny trained checkpoint (read-only by convention: rows that damage one copy it)."""
    from flowercli.runconfig import make_config
    from flowercli.train import train

    cfg = make_config("modern", data_dir=embedded_dir, runs_dir=tmp_path_factory.mktemp("bad-input-runs"), run="g",
                      image_size=16, g_channels=8, d_channels=8, cond_dim=8, batch_size=4, max_steps=1)
    return train(cfg).checkpoint


@dataclass
class Ctx:
    """What a row's setup may use; session fixtures are created only when a row asks for them."""

    tmp: Path
    request: pytest.FixtureRequest
    monkeypatch: pytest.MonkeyPatch

    def fx(self, name: str):
        return self.request.getfixturevalue(name)

    def file(self, name: str, data: bytes | str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def mirror(self, name: str = "mirror") -> Path:
        return Path(shutil.copytree(self.fx("sources_dir"), self.tmp / name))

    def dataset(self, name: str = "data") -> Path:
        """A writable copy of the miniature dataset (no embeddings)."""
        shutil.copytree(self.fx("dataset_dir") / "oxford102", self.tmp / name / "oxford102")
        return self.tmp / name

    def embedded(self, name: str = "data") -> Path:
        """A writable copy of the dataset with its tiny-RoBERTa embeddings."""
        return Path(shutil.copytree(self.fx("embedded_dir"), self.tmp / name))

    def h5(self) -> Path:
        return next((self.fx("embedded_dir") / "embeddings").glob("*.h5"))

    def ckpt_state(self) -> dict:
        return torch.load(self.fx("checkpoint"), map_location="cpu", weights_only=True)

    def save_ckpt(self, name: str, state) -> Path:
        torch.save(state, self.tmp / name)
        return self.tmp / name


@dataclass(frozen=True)
class Row:
    args: Callable[[Ctx], list[str]]
    code: int
    says: tuple[str, ...] = ()  # in the error line (exit 1/2) or on stderr (exit 0)
    leaves: tuple[str, ...] = ()  # paths under tmp a failed command may leave (documented behaviour)
    check: Callable[[Ctx], None] | None = None  # extra checks after a successful command
    marks: tuple = ()


def train_args(ctx: Ctx, data: Path, *extra: str, run: str = "r") -> list[str]:
    return ["train", "--data-dir", str(data), "--runs-dir", str(ctx.tmp / "runs"), "--run", run, *TINY, *extra]


def gen_args(ctx: Ctx, *extra: str, ckpt: Path | None = None) -> list[str]:
    return ["generate", *extra, "--checkpoint", str(ckpt or ctx.fx("checkpoint")), "--out", str(ctx.tmp / "out"),
            "--device", "cpu"]


def captions_zip_without_text_c10(ctx: Ctx) -> Path:
    path = ctx.tmp / "caps.zip"
    with tarfile.open(ctx.fx("sources_dir") / "captions.tgz") as t, zipfile.ZipFile(path, "w") as z:
        for m in t.getmembers():
            if m.isfile() and "text_c10" not in m.name:
                z.writestr(m.name, t.extractfile(m).read())
    return path


def _mirror_without(ctx: Ctx, name: str) -> list[str]:
    mirror = ctx.mirror()
    (mirror / name).unlink()
    return ["download", "--mirror", str(mirror), "-d", str(ctx.tmp / "data")]


def _mirror_bad_sums(ctx: Ctx) -> list[str]:
    mirror = ctx.mirror()
    (mirror / "SHA256SUMS").write_text("this is not a checksum list\n")
    return ["download", "--mirror", str(mirror), "-d", str(ctx.tmp / "data")]


def _odd_download(ctx: Ctx) -> list[str]:
    ctx.mirror("mïrror with spaces ✿")
    return ["download", "--mirror", "mïrror with spaces ✿", "-d", "dätä dir/ünder", "-q"]


def _odd_download_check(ctx: Ctx) -> None:
    layout = DataLayout(ctx.tmp / "dätä dir" / "ünder")
    assert len(list(layout.jpg.iterdir())) == 24 and layout.manifest.is_file()


def _odd_embed(ctx: Ctx) -> list[str]:
    ctx.dataset("dätä dir ✿")
    shutil.copytree(ctx.fx("tiny_roberta"), ctx.tmp / "my models" / "tiny rôberta")
    return ["embed", "--encoder", "my models/tiny rôberta", "-d", "dätä dir ✿", "--device", "cpu", "-q"]


def _odd_embed_check(ctx: Ctx) -> None:
    from flowercli.embeddings import read_embeddings_attrs

    path, = (ctx.tmp / "dätä dir ✿" / "embeddings").glob("tiny-*.h5")
    attrs = read_embeddings_attrs(path)
    # Stored absolute: `generate` must find the encoder again from any working directory.
    assert attrs["encoder"] == str((ctx.tmp / "my models" / "tiny rôberta").resolve())


def _odd_train(ctx: Ctx) -> list[str]:
    shutil.copytree(ctx.fx("embedded_dir"), ctx.tmp / "dätä ✿")
    return ["train", "-d", "dätä ✿", "--runs-dir", "rüns dir", "--run", "my run ✿", *TINY, "-q"]


def _odd_generate(ctx: Ctx) -> list[str]:
    shutil.copy(ctx.fx("checkpoint"), ctx.tmp / "chéck point.pt")
    return ["generate", "a rëd flower ✿ with 🌸 petals", "-n", "2", "-c", "chéck point.pt", "--out", "oüt dir/✿",
            "--device", "cpu", "-q"]


def _long_prompt(ctx: Ctx) -> list[str]:
    ctx.file("prompts.txt", "a red flower with " + "very " * 20_000 + "round petals\nshort one\n")
    return gen_args(ctx, "--prompts-file", str(ctx.tmp / "prompts.txt"), "-n", "1")


def _caption_not_utf8(ctx: Ctx) -> list[str]:
    data = ctx.dataset()
    next((DataLayout(data).text_c10).rglob("image_00003.txt")).write_bytes(b"a red \xff\xfe flower\n")
    return ["embed", "--encoder", str(ctx.fx("tiny_roberta")), "-d", str(data), "--device", "cpu"]


def _caption_too_big(ctx: Ctx) -> list[str]:
    data = ctx.dataset()
    next((DataLayout(data).text_c10).rglob("image_00003.txt")).write_bytes(b"a red flower\n" * 90_000)  # 1.2 MB
    return ["embed", "--encoder", str(ctx.fx("tiny_roberta")), "-d", str(data), "--device", "cpu"]


def _labels_corrupt(ctx: Ctx) -> list[str]:
    data = ctx.dataset()
    DataLayout(data).labels_mat.write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    return ["embed", "--encoder", str(ctx.fx("tiny_roberta")), "-d", str(data), "--device", "cpu"]


def _no_text_c10(ctx: Ctx) -> list[str]:
    data = ctx.dataset()
    shutil.rmtree(DataLayout(data).text_c10)
    return ["embed", "--encoder", str(ctx.fx("tiny_roberta")), "-d", str(data)]


def _embeddings_folder_is_a_file(ctx: Ctx) -> list[str]:
    data = ctx.dataset()
    (data / "embeddings").write_text("in the way")
    return ["embed", "--encoder", str(ctx.fx("tiny_roberta")), "-d", str(data), "--device", "cpu"]


def _corrupt_h5(ctx: Ctx, how: str) -> list[str]:
    data = ctx.embedded()
    h5 = next((data / "embeddings").glob("*.h5"))
    raw = h5.read_bytes()
    h5.write_bytes(raw[: len(raw) // 2] if how == "truncated" else b"\x89HDF\r\n junk" * 100)
    return train_args(ctx, data)


def _corrupt_image(ctx: Ctx) -> list[str]:
    data = ctx.embedded()
    (DataLayout(data).jpg / "image_00001.jpg").write_bytes(b"\xff\xd8\xff\xe0 half a jpeg")
    return train_args(ctx, data)


def _dim_mismatch(ctx: Ctx) -> list[str]:
    state = ctx.ckpt_state()
    state["encoder"] = {**state["encoder"], "encoder": "minilm", "dim": 384}  # a 32-d generator
    return gen_args(ctx, "a red flower", "-n", "1", ckpt=ctx.save_ckpt("mismatch.pt", state))


def _encoder_gone(ctx: Ctx) -> list[str]:
    state = ctx.ckpt_state()
    state["encoder"] = {**state["encoder"], "encoder": str(ctx.tmp / "deleted-model")}
    return gen_args(ctx, "a red flower", "-n", "1", ckpt=ctx.save_ckpt("gone.pt", state))


def _ckpt_edit(ctx: Ctx, how: str) -> list[str]:
    state = ctx.ckpt_state()
    if how == "schema":
        state["schema_version"] = 99
    elif how == "weights":
        state["G_ema"].pop(sorted(state["G_ema"])[-1])
    elif how == "list":
        state = [1, 2, 3]
    return gen_args(ctx, "a red flower", "-n", "1", ckpt=ctx.save_ckpt(f"{how}.pt", state))


def _truncated_checkpoint(ctx: Ctx) -> list[str]:
    raw = ctx.fx("checkpoint").read_bytes()
    return gen_args(ctx, "a red flower", "-n", "1", ckpt=ctx.file("half.pt", raw[: len(raw) // 2]))


def _resume_unstarted_run(ctx: Ctx, *extra: str) -> list[str]:
    """A run folder a killed first start left: config.json (g_channels 8), no checkpoint."""
    run = ctx.tmp / "runs" / "r"
    run.mkdir(parents=True)
    from flowercli.runconfig import config_to_dict, make_config

    cfg = make_config("modern", data_dir=ctx.fx("embedded_dir"), runs_dir=ctx.tmp / "runs", run="r",
                      embeddings=ctx.h5(), image_size=16, g_channels=8, d_channels=8, batch_size=4, max_steps=1)
    (run / "config.json").write_text(__import__("json").dumps({"config": config_to_dict(cfg)}))
    return train_args(ctx, ctx.fx("embedded_dir"), "--resume", *extra)


def _no_checkpoint_anywhere(ctx: Ctx) -> list[str]:
    import flowercli.generate as g

    ctx.monkeypatch.setattr(g, "PACKAGED", ctx.tmp / "no-packaged-model.pt")
    (ctx.tmp / "runs").mkdir()
    return ["generate", "a red flower", "--runs-dir", str(ctx.tmp / "runs"), "--out", str(ctx.tmp / "out")]


ROWS: dict[str, Row] = {
    # --- download ---------------------------------------------------------------------------
    "download: mirror missing a file": Row(lambda c: _mirror_without(c, "imagelabels.mat"), 1, ("has no imagelabels.mat",)),
    "download: captions zip without text_c10": Row(
        lambda c: ["download", "--mirror", str(c.fx("sources_dir")), "--captions", str(captions_zip_without_text_c10(c)),
                   "-d", str(c.tmp / "data")], 1, ("holds no text_c10/", "--captions"),
        leaves=("data", "data/.downloads")),  # verified archives are kept for the next run (documented)
    "download: SHA256SUMS garbled": Row(_mirror_bad_sums, 1, ("SHA256SUMS line 1",)),
    "download: empty --mirror": Row(lambda c: ["download", "--mirror", " ", "-d", str(c.tmp / "d")], 1, ("--mirror is empty",)),
    "download: --captions does not exist": Row(
        lambda c: ["download", "--mirror", str(c.fx("sources_dir")), "--captions", str(c.tmp / "nope.tgz"),
                   "-d", str(c.tmp / "d")], 1, ("nope.tgz does not exist",)),
    "download: --captions is a folder": Row(
        lambda c: ["download", "--mirror", str(c.fx("sources_dir")), "--captions", str(c.tmp),
                   "-d", str(c.tmp / "d")], 1, ("is a folder",)),
    "download: ftp mirror": Row(lambda c: ["download", "--mirror", "ftp://example.org/f/", "-d", str(c.tmp / "d")],
                                1, ("not a folder", "http(s)")),
    "download: --data-dir is a file": Row(
        lambda c: ["download", "--mirror", str(c.fx("sources_dir")), "-d", str(c.file("afile", "x"))], 1,
        ("is a file, not a folder",)),
    "download: --data-dir under a file": Row(
        lambda c: ["download", "--mirror", str(c.fx("sources_dir")), "-d", str(c.file("afile", "x") / "sub")], 1,
        ("afile is a file, not a folder",)),
    "download: --data-dir under /proc": Row(
        lambda c: ["download", "--mirror", str(c.fx("sources_dir")), "-d", "/proc/flowercli-data"], 1,
        ("cannot create /proc/flowercli-data", "nothing can be created in /proc", "--data-dir"), marks=(ON_LINUX,)),
    "download: odd relative paths work": Row(_odd_download, 0, check=_odd_download_check),
    # --- embed ------------------------------------------------------------------------------
    "embed: missing data dir": Row(lambda c: ["embed", "--encoder", "minilm", "-d", str(c.tmp / "nowhere")], 1,
                                   ("flowercli download",)),
    "embed: dataset without text_c10": Row(_no_text_c10, 1, ("text_c10 is missing",)),
    "embed: caption file not UTF-8": Row(_caption_not_utf8, 1, ("image_00003.txt is not UTF-8", "UTF-8 captions archive",
                                                                "--captions")),
    "embed: caption file over the size cap": Row(_caption_too_big, 1, ("image_00003.txt is larger than 1,048,576 bytes",)),
    "embed: --data-dir is a file": Row(lambda c: ["embed", "--encoder", "minilm", "-d", str(c.file("afile", "x"))], 1,
                                       ("data folder", "afile is a file, not a folder", "--data-dir")),
    "embed: corrupt imagelabels.mat": Row(_labels_corrupt, 1, ("imagelabels.mat is not a readable .mat file",)),
    "embed: unknown encoder folder": Row(lambda c: ["embed", "--encoder", "./no/such/model", "-d", str(c.dataset())],
                                         1, ("does not exist", "--encoder minilm")),
    "embed: encoder is a file": Row(lambda c: ["embed", "--encoder", str(c.file("model.bin", b"\0")), "-d", str(c.dataset())],
                                    1, ("is a file, not a model folder",)),
    "embed: encoder folder without config.json": Row(
        lambda c: ["embed", "--encoder", str(c.file("empty-model/README", "hi").parent), "-d", str(c.dataset()),
                   "--device", "cpu"], 1, ("no config.json",)),
    "embed: unknown --pooling": Row(lambda c: ["embed", "--pooling", "nope", "-d", str(c.tmp)], 2, ("--pooling",)),
    "embed: --batch-size 0": Row(lambda c: ["embed", "--batch-size", "0", "-d", str(c.tmp)], 2, ("--batch-size",)),
    "embed: --max-length 1": Row(lambda c: ["embed", "--max-length", "1", "-d", str(c.tmp)], 2, ("--max-length",)),
    "embed: --device nonsense": Row(lambda c: ["embed", "--encoder", str(c.fx("tiny_roberta")), "--device", "gpu0",
                                               "-d", str(c.dataset())], 1, ("unknown device 'gpu0'",)),
    "embed: embeddings folder is a file": Row(_embeddings_folder_is_a_file, 1, ("is a file, not a folder",)),
    "embed: odd relative paths work": Row(_odd_embed, 0, check=_odd_embed_check),
    # --- train ------------------------------------------------------------------------------
    "train: no embeddings yet": Row(lambda c: train_args(c, c.dataset()), 1, ("flowercli embed",)),
    "train: unknown --encoder": Row(lambda c: train_args(c, c.fx("embedded_dir"), "--encoder", "nope"), 1,
                                    ("nope.h5 does not exist", "flowercli embed")),
    "train: --embeddings truncated": Row(lambda c: _corrupt_h5(c, "truncated"), 1, ("corrupt or truncated", ".h5")),
    "train: --embeddings garbage": Row(lambda c: _corrupt_h5(c, "garbage"), 1, ("corrupt or truncated", ".h5")),
    "train: corrupt image": Row(_corrupt_image, 1, ("image_00001.jpg is corrupt",)),
    "train: --recipe nope": Row(lambda c: train_args(c, c.fx("embedded_dir"), "--recipe", "nope"), 1, ("unknown recipe",)),
    # Values --set refuses while parsing are usage errors (2); the others are refused before the run starts (1).
    "train: model.loss=nope": Row(
        lambda c: train_args(c, c.fx("embedded_dir"), "--set", "model.loss=nope"), 2, ("'nope'",)),
    "train: model.d_head=nope": Row(
        lambda c: train_args(c, c.fx("embedded_dir"), "--set", "model.d_head=nope"), 2, ("'nope'",)),
    "train: model.aux_weight=-1": Row(
        lambda c: train_args(c, c.fx("embedded_dir"), "--set", "model.aux_weight=-1"), 1, ("model.aux_weight",)),
    "train: model.mode_seek=-1": Row(
        lambda c: train_args(c, c.fx("embedded_dir"), "--set", "model.mode_seek=-1"), 1, ("model.mode_seek",)),
    "train: model.contrastive=-1": Row(
        lambda c: train_args(c, c.fx("embedded_dir"), "--set", "model.contrastive=-1"), 1, ("model.contrastive",)),
    "train: model.diffaug=nope": Row(
        lambda c: train_args(c, c.fx("embedded_dir"), "--set", "model.diffaug=nope"), 1, ("nope",)),
    "train: model.image_size=48": Row(
        lambda c: train_args(c, c.fx("embedded_dir"), "--set", "model.image_size=48"), 1, ("48", "power of two")),
    "train: --device nonsense": Row(lambda c: train_args(c, c.fx("embedded_dir"), "--device", "nonsense"), 1,
                                    ("unknown device",)),
    "train: --precision nonsense": Row(lambda c: train_args(c, c.fx("embedded_dir"), "--precision", "fp8"), 1,
                                       ("unknown precision",)),
    "train: --batch-size 0": Row(lambda c: train_args(c, c.fx("embedded_dir"), "--batch-size", "0"), 2, ("--batch-size",)),
    "train: --batch-size above the data": Row(lambda c: train_args(c, c.fx("embedded_dir"), "--batch-size", "1000"), 1,
                                              ("--batch-size 1000",)),
    "train: wrong --split": Row(lambda c: train_args(c, c.fx("embedded_dir"), "--split", "Classes"), 1,
                                ("unknown split",)),
    "train: --resume of a run that does not exist starts it": Row(
        lambda c: train_args(c, c.fx("embedded_dir"), "--resume", run="never-trained"), 0,
        ("never-trained has no checkpoint yet: starting it from step 0",),
        check=lambda c: (c.tmp / "runs" / "never-trained" / "checkpoints" / "step-0000001.pt").is_file()),
    "train: --resume of an unstarted run with other settings": Row(
        lambda c: _resume_unstarted_run(c, "--set", "g_channels=16"), 1,
        ("model.g_channels differs: 8 vs 16", "config.json"),
        leaves=("runs/r/.lock",)),  # the lock file every run folder gets
    "train: --data-dir is a file": Row(lambda c: train_args(c, c.file("afile", "x")), 1,
                                       ("afile is a file, not a folder", "--data-dir")),
    "train: --runs-dir under /proc": Row(
        lambda c: ["train", "-d", str(c.fx("embedded_dir")), "--runs-dir", "/proc/flowercli-runs", *TINY], 1,
        ("cannot create run folder /proc/flowercli-runs", "nothing can be created in /proc"), marks=(ON_LINUX,)),
    "train: --runs-dir is a file": Row(
        lambda c: ["train", "-d", str(c.fx("embedded_dir")), "--runs-dir", str(c.file("afile", "x")), *TINY], 1,
        ("afile",)),
    "train: odd relative paths work": Row(_odd_train, 0,
                                          check=lambda c: (c.tmp / "rüns dir" / "my run ✿" / "checkpoints" / "latest.pt").is_file()),
    # --- generate ---------------------------------------------------------------------------
    "generate: whitespace-only prompts file": Row(
        lambda c: gen_args(c, "--prompts-file", str(c.file("p.txt", "  \n\t\n")), "-n", "1"), 1, ("give at least one prompt",)),
    "generate: non-UTF-8 prompts file": Row(
        lambda c: gen_args(c, "--prompts-file", str(c.file("p.txt", b"a red \xff flower\n")), "-n", "1"), 1,
        ("is not UTF-8",)),
    "generate: prompts file missing": Row(lambda c: gen_args(c, "--prompts-file", str(c.tmp / "nope.txt")), 1,
                                          ("cannot read --prompts-file",)),
    "generate: very long prompt works": Row(_long_prompt, 0, ("truncated",),
                                            check=lambda c: (c.tmp / "out" / "p001-seed0000.png").is_file()),
    "generate: -n just above the limit": Row(lambda c: gen_args(c, "a red flower", "-n", "10001"), 1,
                                             ("-n must be between 1 and 10000",)),
    "generate: -n not a number": Row(lambda c: gen_args(c, "a red flower", "-n", "many"), 2, ("'-n'",)),
    "generate: encoder/checkpoint dimension mismatch": Row(_dim_mismatch, 1, ("384-d", "32-d")),
    "generate: the checkpoint's encoder is gone": Row(_encoder_gone, 1, ("deleted-model", "available again")),
    "generate: checkpoint folder without checkpoints": Row(
        lambda c: gen_args(c, "a red flower", ckpt=c.file("run/config.json", "{}").parent), 1, ("has no checkpoints yet",)),
    "generate: empty checkpoint file": Row(
        lambda c: gen_args(c, "a red flower", ckpt=c.file("empty.pt", b"")), 1, ("empty.pt is empty",)),
    "generate: checkpoint of another schema": Row(lambda c: _ckpt_edit(c, "schema"), 1, ("schema version 99",)),
    "generate: truncated checkpoint": Row(_truncated_checkpoint, 1, ("half.pt is damaged or incomplete (truncated?",
                                                                    "use another checkpoint")),
    "generate: --out under /proc": Row(lambda c: gen_args(c, "a red flower", "-n", "1") + ["--out", "/proc/flowercli-out"],
                                       1, ("/proc/flowercli-out", "nothing can be created in /proc"), marks=(ON_LINUX,)),
    "generate: checkpoint missing a weight": Row(lambda c: _ckpt_edit(c, "weights"), 1, ("does not match", "Missing key")),
    "generate: checkpoint that is no dict": Row(lambda c: _ckpt_edit(c, "list"), 1, ("not a flowercli checkpoint",)),
    "generate: no checkpoint anywhere": Row(_no_checkpoint_anywhere, 1, ("no checkpoint found", "--checkpoint")),
    "generate: --out is a file": Row(lambda c: gen_args(c, "a red flower") + ["--out", str(c.file("afile", "x"))], 1,
                                     ("is a file, not a folder",)),
    "generate: --steps 1": Row(lambda c: gen_args(c, "--interpolate", "a", "--interpolate", "b", "--steps", "1"), 1,
                               ("--steps must be between",)),
    "generate: --device nonsense": Row(lambda c: gen_args(c, "a red flower") + ["--device", "tpu"], 1,
                                       ("unknown device",)),
    "generate: odd relative paths work": Row(_odd_generate, 0,
                                             check=lambda c: (c.tmp / "oüt dir" / "✿" / "seed0001.png").is_file()),
    # --- eval and the root command -----------------------------------------------------------
    "eval: wrong --split": Row(lambda c: ["eval", "--run", "x", "--split", "nope"], 2, ("--split",)),
    "eval: no model named": Row(lambda c: ["eval"], 1, ("--run NAME or --checkpoint PATH",)),
    "eval: --data-dir is a file": Row(
        lambda c: ["eval", "--checkpoint", str(c.fx("checkpoint")), "-d", str(c.file("afile", "x")), "--device", "cpu"],
        1, ("afile is a file, not a folder", "--data-dir")),
    "eval: run does not exist": Row(lambda c: ["eval", "--run", "nope", "--runs-dir", str(c.tmp)], 1, ("no run named",)),
    "flowercli: unknown command": Row(lambda c: ["florp"], 2, ("florp",)),
}

KNOWN: dict = {}  # rows expected to fail (strict xfail marks); none at present


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else (-1, 0)
            for p in root.rglob("*")}


def _error_line(result, code: int) -> str:
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines, f"no message on stderr: {result.output!r}"
    if code == 2:  # Typer's usage error: a framed block that ends in the error and points to --help
        assert "Try 'flowercli" in result.stderr and "--help" in result.stderr, result.stderr
        return next(line for line in lines if "Error" in line or "No such command" in line)
    assert lines[-1].startswith("Error: "), result.stderr
    assert sum(line.startswith("Error") for line in lines) == 1, result.stderr
    return lines[-1]


def _marks(name: str) -> list:
    known = KNOWN.get(name, ())
    return [*ROWS[name].marks, *(known if isinstance(known, (tuple, list)) else [known])]


@pytest.mark.parametrize("name", [pytest.param(n, id=n, marks=_marks(n)) for n in ROWS])
def test_bad_input(name, tmp_path, request, monkeypatch):
    row = ROWS[name]
    monkeypatch.chdir(tmp_path)  # relative paths and defaults (data/, runs/, out/) land in the checked folder
    for var in (DATA_DIR_ENV, RUNS_DIR_ENV):
        monkeypatch.delenv(var, raising=False)
    ctx = Ctx(tmp_path, request, monkeypatch)
    args = row.args(ctx)
    before = snapshot(tmp_path)

    result = runner.invoke(app, args)

    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"uncaught {result.exception!r}: a traceback"
    assert "Traceback" not in result.output
    assert result.exit_code == row.code, result.output
    if row.code == 0:
        for text in row.says:
            assert text in result.stderr, result.stderr
        if row.check:
            assert row.check(ctx) is not False
        return
    line = _error_line(result, row.code)
    for text in row.says:
        assert text in line, line
    if row.code == 1:
        assert ADVICE.search(line.split(":", 1)[1]), f"says what is wrong but not what to do: {line}"
    assert result.stdout == "", "a failed command printed results"
    after = snapshot(tmp_path)
    allowed = set(row.leaves)
    new = {k for k in after if k not in before and k not in allowed and not any(k.startswith(a + "/") for a in row.leaves)}
    changed = {k for k in before if after.get(k) != before[k]}
    assert not new and not changed, f"left behind: {sorted(new)}, changed: {sorted(changed)}"


def test_the_table_is_big_enough_and_covers_every_command():
    commands = {name.split(":")[0] for name in ROWS}
    assert {"download", "embed", "train", "generate", "eval"} <= commands
    assert len(ROWS) >= 30


def test_failed_train_leaves_no_run_folder(tmp_path, embedded_dir):
    res = runner.invoke(app, ["train", "-d", str(embedded_dir), "--runs-dir", str(tmp_path / "runs"), "--run", "x",
                              *TINY, "--split", "nope"])
    assert res.exit_code == 1
    # --resume on a run without checkpoints starts it; failing then (after the run folder was made) cleans up too
    res = runner.invoke(app, ["train", "-d", str(embedded_dir), "--runs-dir", str(tmp_path / "runs"), "--run", "y",
                              *TINY, "--resume", "--batch-size", "1000"])
    assert res.exit_code == 1 and "no checkpoint yet" in res.stderr and "--batch-size 1000" in res.stderr
    assert not (tmp_path / "runs" / "x").exists() and not (tmp_path / "runs" / "y").exists()
