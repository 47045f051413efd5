"""Validation of an extracted dataset against its own .mat files: short captions counted, parts that
do not belong together refused, contradicting split files and oversized caption files named.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import flowercli.download as dl
from flowercli.config import DataLayout
from flowercli.errors import DataError

from conftest import N_IMAGES
from download_support import captions_members, cfg, copy_sources, write_archive, write_sums


def test_split_files_that_contradict_each_other_are_refused(sources_dir, tmp_path):
    members = [(n, d) for n, d in captions_members(sources_dir) if n != "testclasses.txt"]
    trainval = dict(members)["trainvalclasses.txt"]
    members.append(("testclasses.txt", trainval.splitlines(keepends=True)[0]))
    caps = write_archive(tmp_path / "caps.tgz", members)
    with pytest.raises(DataError, match=r"in testclasses\.txt and in the training classes"):
        dl.download(cfg(tmp_path / "data", mirror=str(sources_dir), captions=str(caps)))


def test_short_captions_are_counted_not_fatal(sources_dir, tmp_path):
    members = captions_members(sources_dir)
    members = [(n, b"one caption\n\n" if n.endswith(("image_00001.txt", "image_00007.txt")) else d) for n, d in members]
    caps = write_archive(tmp_path / "caps.tgz", members)
    manifest = dl.download(cfg(tmp_path / "data", mirror=str(sources_dir), captions=str(caps)))
    assert manifest["counts"]["images_with_fewer_than_10_captions"] == 2
    assert manifest["counts"]["captions"] == 10 * N_IMAGES - 18


def test_data_that_do_not_belong_together_are_refused(sources_dir, tmp_path):
    import numpy as np
    import scipy.io

    members = [(n, d) for n, d in captions_members(sources_dir) if not n.endswith("image_00005.txt")]
    caps = write_archive(tmp_path / "caps.tgz", members)
    with pytest.raises(DataError, match=r"1 images have no captions file \(first: text_c10/class_00001/image_00005"):
        dl.download(cfg(tmp_path / "d1", mirror=str(sources_dir), captions=str(caps)))

    mirror = copy_sources(sources_dir, tmp_path / "mirror")
    labels = scipy.io.loadmat(mirror / "imagelabels.mat")["labels"]
    scipy.io.savemat(mirror / "imagelabels.mat", {"labels": np.concatenate([labels, [[1]]], axis=1)})
    write_sums(mirror)
    with pytest.raises(DataError, match=r"lacks 1 of the 25 images .*image_00025\.jpg"):
        dl.download(cfg(tmp_path / "d2", mirror=str(mirror)))

    shutil.copy(sources_dir / "imagelabels.mat", mirror)
    scipy.io.savemat(mirror / "setid.mat", {"trnid": np.arange(1, 20)[None], "valid": np.array([[20]]),
                                            "tstid": np.array([[21]])})
    write_sums(mirror)
    with pytest.raises(DataError, match=r"setid\.mat: .*each image id 1\.\.24 once"):
        dl.download(cfg(tmp_path / "d3", mirror=str(mirror)))
    assert not any((tmp_path / d / "oxford102").exists() for d in ("d1", "d2", "d3"))


def test_oversized_caption_file_is_refused_by_validation(dataset_dir, tmp_path):
    """Caption files are read with a cap: one placed by hand (or let through by raised limits) is named."""
    from flowercli.config import CAPTION_FILE_MAX_BYTES

    layout = DataLayout(Path(shutil.copytree(dataset_dir, tmp_path / "data")))
    path = next(layout.text_c10.rglob("image_00002.txt"))
    path.write_bytes(b"a red flower\n" * (CAPTION_FILE_MAX_BYTES // 13 + 1))
    with pytest.raises(DataError, match=r"caption file text_c10/class_00002/image_00002\.txt is larger than "
                                        r"1,048,576 bytes: not a caption file; pass"):
        dl.validate(layout)
