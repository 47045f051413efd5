"""`manifest.json`: what an installed dataset came from, and the fast path that trusts it.

A later run with the same sources checks the manifest, the file counts and the archives' sha256,
and extracts nothing; so does a run whose new sources yield byte-identical archives (only the
manifest's record of the sources changes).
"""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path

from flowercli.config import SPLIT_FILES, DataLayout
from flowercli.download.sources import ROLES, _basename
from flowercli.download.validation import _CAPTION_RE
from flowercli.fsutil import sha256_file
from flowercli.report import Reporter

MANIFEST_SCHEMA = 1


def caption_set(record: dict) -> dict:
    """Which caption set a dataset holds: the archive's file name and sha256, carried by every later stage."""
    name = posixpath.basename(str(record.get("file") or "")) or _basename(str(record.get("location", "")))
    return {"archive": name, "sha256": record.get("sha256")}


def manifest_caption_set(manifest: dict) -> dict:
    """caption_set of an installed dataset: recorded in its manifest, or (manifests written before it
    was recorded) derived from the manifest's captions source. The one reading `summary` and
    `data.read_caption_set` share."""
    return manifest.get("captions") or caption_set(manifest.get("sources", {}).get("captions", {}))


def summary(manifest: dict, layout: DataLayout) -> dict:
    """The few facts a user or a script wants after `download` (what the CLI prints)."""
    counts = manifest.get("counts", {})
    return {
        "status": manifest.get("status"),
        "dataset": str(layout.dataset),
        "images": counts.get("images"),
        "classes": counts.get("classes"),
        "captions": counts.get("captions"),
        "images_with_fewer_than_10_captions": counts.get("images_with_fewer_than_10_captions"),
        "sources": {role: rec.get("location") for role, rec in manifest.get("sources", {}).items()},
        "caption_set": manifest_caption_set(manifest),
        "split_files": [f"{s}classes.txt" for s in manifest.get("split_files", SPLIT_FILES)],
    }


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_manifest(layout: DataLayout) -> dict | None:
    m = _read_json(layout.manifest)
    return m if m and m.get("schema_version") == MANIFEST_SCHEMA else None


def _verify_existing(layout: DataLayout, request: dict, report: Reporter) -> dict | None:
    """The manifest when the installed dataset is complete and came from `request`, else None."""
    if not layout.dataset.exists():
        return None
    manifest = _read_manifest(layout)
    if manifest is None:
        report.info(f"{layout.dataset} has no valid manifest; installing afresh")
        return None
    if manifest.get("request") != request:
        report.info("sources differ from the last download; checking them")
        return None
    problem = _quick_check(layout, manifest, report)
    if problem:
        report.info(f"{problem}; installing afresh")
        return None
    report.info(f"{layout.dataset} is complete and verified; nothing to do (--force re-extracts)")
    return manifest


def _same_archives(layout: DataLayout, previous: dict, records: dict[str, dict], request: dict,
                   report: Reporter) -> dict | None:
    """New sources that gave byte-identical archives: record them in the manifest, extract nothing."""
    if any(previous.get("sources", {}).get(role, {}).get("sha256") != rec["sha256"] for role, rec in records.items()):
        return None
    if _quick_check(layout, previous, report) is not None:
        return None
    manifest = dict(previous, request=request, sources=records)
    tmp = layout.manifest.with_name(layout.manifest.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, layout.manifest)
    report.info(f"{layout.dataset}: the new sources hold the same archives; manifest updated, nothing extracted")
    return manifest


def _quick_check(layout: DataLayout, manifest: dict, report: Reporter) -> str | None:
    """Cheap checks (listings and a few hashes, no decoding): a reason to reinstall, or None."""
    try:
        counts = manifest["counts"]
        n = int(counts["images"])
        images = {e.name for e in os.scandir(layout.jpg) if e.is_file()}
        if not {f"image_{i:05d}.jpg" for i in range(1, n + 1)} <= images:
            return "images are missing from jpg/"
        captions = sum(1 for d in os.scandir(layout.text_c10) if d.is_dir()
                       for f in os.scandir(d.path) if _CAPTION_RE.fullmatch(f.name))
        if captions < int(counts["caption_files"]):
            return "caption files are missing from text_c10/"
        for split in manifest.get("split_files", SPLIT_FILES):
            if not layout.split_file(split).is_file():
                return f"{layout.split_file(split).name} is missing"
        for name, sha in manifest["files"].items():
            if sha256_file(layout.dataset / name) != sha:
                return f"{name} changed since it was installed"
        for role in ROLES:
            rec = manifest["sources"][role]
            path = layout.root / rec["file"]
            if not path.exists():
                report.info(f"{rec['file']} was removed; checked the installed files only")
            elif sha256_file(path) != rec["sha256"]:
                return f"{rec['file']} changed since it was verified"
    except (OSError, KeyError, TypeError, ValueError) as e:
        return f"the installed dataset is incomplete ({type(e).__name__}: {e})"
    return None
