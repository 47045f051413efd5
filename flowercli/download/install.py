"""Install the dataset: the `download()` entry point, one download per data directory (the lock),
extraction into a temporary folder, validation, and the swap into place.

A killed run leaves no half dataset under the final name, and a failed one keeps the dataset it
would have replaced.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import shutil
import tempfile
import time
from pathlib import Path

from flowercli import __version__
from flowercli.config import SPLIT_FILES, DataLayout, DownloadConfig, missing_split_files
from flowercli.download.archive import safe_extract
from flowercli.download.fetch import _ensure_archive
from flowercli.download.http import _Http
from flowercli.download.manifest import MANIFEST_SCHEMA, _read_manifest, _same_archives, _verify_existing, caption_set
from flowercli.download.sources import CAPTIONS_NAME, _request, resolve_sources
from flowercli.download.validation import _IMAGE_RE, validate
from flowercli.errors import DataError, FlowerError
from flowercli.fsutil import exclusive_lock
from flowercli.report import Reporter


def download(cfg: DownloadConfig, report: Reporter = Reporter()) -> dict:
    """Make `<data_dir>/oxford102/` a complete, verified dataset; return its manifest.

    The returned dict is the content of `manifest.json` plus `"status"`: `"verified"` when the data
    was already complete (nothing extracted) or `"installed"` when it was (re-)extracted.
    """
    layout = DataLayout(Path(cfg.data_dir))
    request = _request(cfg)
    fresh = [p for p in (layout.root, layout.downloads) if not p.exists()]
    try:
        return _download(cfg, layout, request, report)
    except BaseException:
        _remove_if_unused(fresh, layout)
        raise


def _download(cfg: DownloadConfig, layout: DataLayout, request: dict, report: Reporter) -> dict:
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
        layout.downloads.mkdir(parents=True, exist_ok=True)
        with _lock(layout):
            if not cfg.force:
                manifest = _verify_existing(layout, request, report)
                if manifest is not None:
                    return dict(manifest, status="verified")
            _remove_stale_temporaries(layout, report)
            previous = _read_manifest(layout)
            with _Http(cfg, report) as net:
                sources = resolve_sources(cfg, net, report)
                records = {s.role: _ensure_archive(s, layout, net, previous, report) for s in sources}
            if not cfg.force and previous is not None:
                manifest = _same_archives(layout, previous, records, request, report)
                if manifest is not None:
                    return dict(manifest, status="verified")
            manifest = _install(layout, records, request, cfg, report)
            return dict(manifest, status="installed")
    except FlowerError:
        raise
    except OSError as e:  # file-system trouble (network errors are handled inside _Http)
        raise FlowerError(_os_error_message(e, layout.root)) from e


def _remove_if_unused(fresh: list[Path], layout: DataLayout) -> None:
    """A run that failed before fetching anything (bad --mirror, ...) leaves no empty data folder.

    Only the folders this run created, and only while they hold nothing but our lock file.
    """
    if layout.downloads in fresh:
        try:
            with _lock(layout):  # refuses while another download works here
                if {p.name for p in layout.downloads.iterdir()} <= {".lock"}:
                    (layout.downloads / ".lock").unlink(missing_ok=True)
                    layout.downloads.rmdir()
        except (OSError, FlowerError):
            return  # something else is there now, or someone else is: keep it
    if layout.root in fresh:
        try:
            layout.root.rmdir()  # fails, harmlessly, unless empty
        except OSError:
            pass


def _install(layout: DataLayout, records: dict[str, dict], request: dict, cfg: DownloadConfig,
             report: Reporter) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f".{layout.dataset.name}.tmp-", dir=layout.root))
    try:
        new = DataLayout(tmp)
        new.dataset.mkdir()

        captions = layout.root / records["captions"]["file"]
        report.info(f"Extracting {captions.name}")
        wanted = {f"{s}classes.txt" for s in SPLIT_FILES} | {"classnames.txt"}
        files = safe_extract(captions, tmp / "captions",
                             select=lambda r: "text_c10" in r.split("/") or posixpath.basename(r) in wanted,
                             limits=cfg.captions_limits, what="a captions archive", report=report)
        _place_captions(captions.name, tmp / "captions", files, new)

        images = layout.root / records["images"]["file"]
        report.info(f"Extracting {images.name}")
        files = safe_extract(images, tmp / "images", select=lambda r: bool(_IMAGE_RE.fullmatch(posixpath.basename(r))),
                             limits=cfg.images_limits, what="the images archive", report=report)
        folders = {posixpath.dirname(f) for f in files}
        if not files:
            raise DataError(f"{images.name} holds no image_NNNNN.jpg files; is it the Oxford 102 images archive?")
        if len(folders) > 1:
            raise DataError(f"{images.name} has images in {len(folders)} folders; expected one folder (jpg/)")
        os.rename(tmp / "images" / folders.pop(), new.jpg)

        shutil.copyfile(layout.root / records["labels"]["file"], new.labels_mat)
        shutil.copyfile(layout.root / records["setid"]["file"], new.setid_mat)

        report.info("Validating")
        counts = validate(new, report)
        manifest = {
            "schema_version": MANIFEST_SCHEMA,
            "flowercli_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "request": request,
            "sources": records,
            "counts": counts,
            "files": {"imagelabels.mat": records["labels"]["sha256"], "setid.mat": records["setid"]["sha256"]},
            "classnames": (new.dataset / "classnames.txt").exists(),
            "split_files": [s for s in SPLIT_FILES if new.split_file(s).is_file()],
            "captions": caption_set(records["captions"]),
        }
        (new.manifest).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        _swap_into_place(new.dataset, layout.dataset)
        report.info(f"Installed {layout.dataset}")
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _place_captions(archive: str, root: Path, files: list[str], new: DataLayout) -> None:
    """Move text_c10/ and the split files, wherever they sit in the archive, into the new dataset."""
    tops = {"/".join(f.split("/")[: f.split("/").index("text_c10") + 1]) for f in files if "text_c10" in f.split("/")}
    if not tops:
        raise DataError(f"captions archive {archive} holds no text_c10/ folder; pass the Reed et al. archive "
                        f"({CAPTIONS_NAME}) or one in its layout with --captions")
    top = min(tops, key=lambda t: (t.count("/"), t))
    os.rename(root.joinpath(*top.split("/")), new.text_c10)
    home = posixpath.dirname(top)

    def pick(basename: str) -> str | None:
        found = [f for f in files if posixpath.basename(f) == basename and not f.startswith(top + "/")]
        found.sort(key=lambda f: (posixpath.dirname(f) != home, f.count("/"), f))
        return found[0] if found else None

    found = []
    for split in SPLIT_FILES:
        f = pick(f"{split}classes.txt")
        if f is not None:
            os.replace(root.joinpath(*f.split("/")), new.split_file(split))
            found.append(split)
    missing = missing_split_files(found)
    if missing:
        raise DataError(f"captions archive {archive} has no {' or '.join(missing)}; pass an archive with the class "
                        f"split (like {CAPTIONS_NAME}) with --captions")
    f = pick("classnames.txt")
    if f is not None:
        os.replace(root.joinpath(*f.split("/")), new.dataset / "classnames.txt")


def _swap_into_place(new: Path, final: Path) -> None:
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    try:
        os.rename(new, final)
    except OSError:
        if old is not None:
            os.rename(old, final)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_temporaries(layout: DataLayout, report: Reporter) -> None:
    """Folders a killed run left behind; safe to remove because we hold the lock."""
    for p in layout.root.glob(f".{layout.dataset.name}.*"):
        if p.is_dir() and (".tmp-" in p.name or ".old-" in p.name):
            report.debug(f"removing {p} left by an interrupted run")
            shutil.rmtree(p, ignore_errors=True)


def _lock(layout: DataLayout):
    """One download per data directory at a time (a second one would swap folders under the first)."""
    return exclusive_lock(layout.downloads / ".lock", DataError(
        f"another flowercli download is working in {layout.root}; wait for it to finish"))


def _os_error_message(e: OSError, root: Path) -> str:
    where = e.filename or root
    if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return (f"no space left on the device while writing {where}; free some space and re-run "
                "(finished downloads are kept)")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {where} ({e.strerror}); choose a writable --data-dir"
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        from flowercli.fsutil import nearest_existing

        blocker = nearest_existing(Path(where))
        return f"cannot write {where}: {blocker} is a file, not a folder; choose another --data-dir"
    if (e.errno == errno.ENOENT and e.filename
            and Path(os.path.abspath(e.filename)).is_relative_to(os.path.abspath(root))):
        from flowercli.fsutil import write_error_text

        return f"cannot create {where}: {write_error_text(e)}; choose another --data-dir"
    return f"{e.strerror or e} ({where}); check the --data-dir folder"
