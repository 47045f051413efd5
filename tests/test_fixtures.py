"""The fixtures themselves must be right, or every other test is testing the wrong thing."""

import tarfile

import scipy.io

from conftest import N_IMAGES


def test_sources_layout(sources_dir):
    with tarfile.open(sources_dir / "102flowers.tgz") as t:
        names = [m.name for m in t.getmembers() if m.isfile()]
    assert len(names) == N_IMAGES and names[0] == "jpg/image_00001.jpg"
    labels = scipy.io.loadmat(sources_dir / "imagelabels.mat")["labels"].ravel()
    assert len(labels) == N_IMAGES and labels.min() == 1
    with tarfile.open(sources_dir / "captions.tgz") as t:
        names = t.getnames()
    assert "cvpr2016_flowers/text_c10/class_00001/image_00001.txt" in names
    assert "cvpr2016_flowers/testclasses.txt" in names


def test_tiny_roberta_loads(tiny_roberta):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_roberta, local_files_only=True)
    model = AutoModel.from_pretrained(tiny_roberta, local_files_only=True)
    batch = tok(["this flower has red petals"], return_tensors="pt")
    assert batch["input_ids"].shape[1] > 3
    assert model(**batch).last_hidden_state.shape[-1] == 32
