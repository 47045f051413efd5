"""The manifest's fast path: a complete dataset from the same sources (or byte-identical archives)
is verified, not extracted again; damage is noticed and repaired from the kept archives.
"""

from __future__ import annotations

import json
import shutil
import time

import flowercli.download as dl
from flowercli.config import DataLayout
from flowercli.download import install

from download_support import cfg, copy_sources, dataset_files


def test_second_run_is_a_fast_noop_and_force_reextracts(sources_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    dl.download(cfg(data, mirror=str(sources_dir)))
    before = dataset_files(data)
    calls = []
    real = install.safe_extract
    monkeypatch.setattr(install, "safe_extract", lambda *a, **k: calls.append(a) or real(*a, **k))
    t0 = time.perf_counter()
    again = dl.download(cfg(data, mirror=str(sources_dir)))
    assert time.perf_counter() - t0 < 2.0
    assert again["status"] == "verified" and calls == [] and dataset_files(data) == before
    forced = dl.download(cfg(data, mirror=str(sources_dir), force=True))
    assert forced["status"] == "installed" and len(calls) == 2
    assert dataset_files(data).keys() == before.keys()


def test_noop_check_notices_damage_and_repairs_from_kept_archives(sources_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    mirror = copy_sources(sources_dir, tmp_path / "mirror")
    dl.download(cfg(data, mirror=str(mirror)))
    (DataLayout(data).jpg / "image_00003.jpg").unlink()
    shutil.rmtree(mirror)  # the repair must come from .downloads, not from the mirror
    mirror.mkdir()
    (mirror / "SHA256SUMS").write_text((sources_dir / "SHA256SUMS").read_text())
    for name in ("imagelabels.mat", "setid.mat", "102flowers.tgz", "captions.tgz"):
        (mirror / name).write_bytes(b"not used")
    out = dl.download(cfg(data, mirror=str(mirror)))
    assert out["status"] == "installed" and (DataLayout(data).jpg / "image_00003.jpg").is_file()


def test_another_copy_of_the_same_mirror_is_not_extracted_again(sources_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    dl.download(cfg(data, mirror=str(sources_dir)))
    before = dataset_files(data)
    other = copy_sources(sources_dir, tmp_path / "other")
    calls = []
    monkeypatch.setattr(install, "safe_extract", lambda *a, **k: calls.append(a))
    out = dl.download(cfg(data, mirror=str(other)))
    assert out["status"] == "verified" and calls == []
    assert json.loads(DataLayout(data).manifest.read_text())["request"]["mirror"] == str(other)
    before.pop("manifest.json")
    after = dataset_files(data)
    after.pop("manifest.json")
    assert after == before
    # and now it is the plain fast path for that mirror
    assert dl.download(cfg(data, mirror=str(other)))["status"] == "verified"


def test_one_caption_set_reading_for_the_summary_and_the_later_stages(tmp_path):
    """`download`'s summary and `data.read_caption_set` (embed, train, eval) read a manifest the same way."""
    from flowercli.data import read_caption_set

    layout = DataLayout(tmp_path)
    layout.dataset.mkdir(parents=True)
    source = {"file": ".downloads/reed.tgz", "location": "/mirror/reed.tgz", "sha256": "a" * 64}
    for manifest in ({"sources": {"captions": source}, "captions": {"archive": "reed.tgz", "sha256": "a" * 64}},
                     {"sources": {"captions": source}}):  # written before the caption set was recorded
        layout.manifest.write_text(json.dumps(manifest))
        assert dl.summary(manifest, layout)["caption_set"] == {"archive": "reed.tgz", "sha256": "a" * 64}
        assert read_caption_set(layout) == {"captions_archive": "reed.tgz", "captions_sha256": "a" * 64}
    for unknown in ({"sources": {"captions": {"file": ".downloads/reed.tgz"}}}, {"sources": []}, ["not a manifest"]):
        layout.manifest.write_text(json.dumps(unknown))
        assert read_caption_set(layout) == {}
    layout.manifest.unlink()
    assert read_caption_set(layout) == {}
