"""The model card text, built from plain dicts (no model, no files)."""

import math

import yaml

from flowercli.modelcard import card_path_for, figures, model_card


def state(**changes):
    s = {"schema_version": 1, "step": 20716, "epoch": 197,
         "config": {"recipe": "modern", "batch_size": 64, "lr_g": 4e-4, "lr_d": 1.6e-3, "beta1": 0.0, "beta2": 0.9,
                    "ema": 0.999, "seed": 0, "split": "auto",
                    "model": {"image_size": 64, "g_channels": 32, "d_channels": 32, "noise_dim": 100, "cond_dim": 128,
                              "loss": "hinge", "cond_aug": True, "n_classes": 82}},
         "encoder": {"encoder": "minilm", "pooling": "mean", "dim": 384, "normalised": False,
                     "captions_archive": "captions_reed.tgz", "captions_sha256": "f23b" * 16},
         "data": {"split": "classes", "classes": list(range(21, 103))},
         "meta": {"dtype": "float16"}}
    for k, v in changes.items():
        s[k] = v
    return s


def report():
    ceiling = {"n": 293, "top1": 0.8, "top5": 0.95}
    return {
        "protocol": {"split": "test", "seed": 0, "condition": "mean"},
        "run": {"image_size": 64},
        "fid": {"value": 84.15, "n_generated": 2048, "n_real": 1464,
                "ceiling": {"value": 35.7, "n_a": 732, "n_b": 732}},
        "class_accuracy": {"test": {"top1": 0.0415, "top5": 0.1855, "n": 2048, "unseen_classes": True, "classes": 20,
                                    "ceiling": ceiling},
                           "train": {"top1": 0.488, "top5": 0.711, "n": 256, "unseen_classes": False,
                                     "ceiling": ceiling},
                           "classifier": {"top1": 0.83}},
        "colour": {"agreement": 1.0, "n": 224, "ceiling": {"agreement": 0.79, "n_images": 1464}},
        "diversity": {"k": 3, "precision": 0.5, "recall": 0.1, "density": 0.4, "coverage": float("nan"),
                      "n_generated": 2048, "n_real": 1464,
                      "ceiling": {"precision": 0.7, "recall": 0.7, "density": 1.0, "coverage": 0.9,
                                  "n_a": 732, "n_b": 732},
                      "within_prompt": {"prompts": 64, "seeds": 8, "ceiling": 1.0, "features": {"mean": 0.71}}},
        "species_names": {"unseen": {"top1": 0.02, "n": 160, "ceiling": {"n": 293, "top1": 0.8}},
                          "train": {"top1": 0.3, "n": 656, "ceiling": {"n": 1340, "top1": 0.83}}},
        "caption_set": {"data": {"archive": "captions_reed.tgz", "sha256": "f23b" * 16}},
    }


def front(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_front_matter_is_yaml_with_a_metric_per_figure():
    card = model_card(state(meta={"eval": report()}), "generator.safetensors", 3_583_561)
    fm = front(card)
    assert fm["license"] == "mit" and "text-to-image" in fm["tags"] and fm["datasets"] == ["oxford_flowers102"]
    (entry,) = fm["model-index"]
    assert entry["name"] == "generator"
    (result,) = entry["results"]
    assert result["dataset"]["split"] == "test" and "unseen" in result["dataset"]["name"]
    metrics = {m["name"]: (m["type"], m["value"]) for m in result["metrics"]}
    assert metrics["FID, unseen-class captions"] == ("fid", 84.15)
    assert metrics["class top-1, unseen-class captions"] == ("accuracy", 0.0415)
    assert metrics["class top-1, training-class captions"] == ("accuracy", 0.488)
    assert metrics["colour agreement"] == ("accuracy", 1.0)
    assert metrics["recall (k-NN, k = 3)"] == ("recall", 0.1)
    assert not any(m.startswith("coverage") for m in metrics)  # NaN: not a figure
    assert metrics["species-name prompts, unseen species, top-1"] == ("accuracy", 0.02)
    assert len(metrics) == len(figures(report()))


def test_figures_have_their_n_and_ceiling_in_the_table():
    card = model_card(state(meta={"eval": report()}), "m.safetensors")
    assert "| FID, unseen-class captions | 84.2 | 2,048 generated vs 1,464 real | 35.7 (732 vs 732 real) |" in card
    assert "| class top-1, unseen-class captions | 4.2 % | 2,048 images | 80.0 % (293 real) |" in card
    assert "| colour agreement | 100.0 % | 224 images | 79.0 % (1,464 real) |" in card
    assert "| within-prompt diversity (Inception features) | 0.71 | 64 captions x 8 seeds | 1 (real images) |" in card
    assert "4.2 % of the images for unseen species, against 48.8 % for training species" in card


def test_sections_and_recorded_facts():
    card = model_card(state(meta={"dtype": "float16", "training": {"cpu_seconds": 7152.9, "wall_seconds": 3612,
                                                                     "device": "2-core test CPU"}}),
                      "generator.safetensors", 3_583_561)
    for heading in ("## What it is", "## Training data", "## Recipe", "## Training budget", "## Evaluation",
                    "## Intended use and limits"):
        assert heading in card
    assert f"caption set `captions_reed.tgz`, sha256 `{'f23b' * 16}`" in card
    assert "trained on the images of 82 classes" in card
    assert "20,716 steps; 197 epochs; batch 64." in card
    assert "7,153 CPU-seconds (1.99 CPU-hours), 3,612 s wall." in card and "Machine: 2-core test CPU." in card
    assert "`minilm` (mean pooling, 384-d)" in card and "64×64" in card and "3.6 MB" in card
    assert "--checkpoint generator.safetensors" in card
    assert "No evaluation report" in card and "model-index" not in card


def test_what_is_not_recorded_is_said_so():
    enc = {"encoder": "minilm", "pooling": "mean", "dim": 384}
    card = model_card(state(encoder=enc, meta={}), "m.pt")
    assert "does not record which caption set" in card
    assert "CPU time: not recorded." in card and "Machine: not recorded." in card
    # A caption set recorded at release for a checkpoint older than the record, with its note.
    card = model_card(state(encoder=enc, meta={"caption_set": {"archive": "c.tgz", "sha256": "ab" * 32,
                                                               "note": "Recorded at release."}}), "m.pt")
    assert f"caption set `c.tgz`, sha256 `{'ab' * 32}`. Recorded at release." in card


def test_old_reports_and_odd_values_do_not_break_the_card():
    old = report()
    for k in ("diversity", "species_names", "caption_set"):
        old.pop(k)
    old["fid"]["value"] = None
    card = model_card(state(meta={"eval": old}), 'a "quoted": name.safetensors')
    fm = front(card)
    names = [m["name"] for m in fm["model-index"][0]["results"][0]["metrics"]]
    assert names and not any("FID" in n or "recall" in n for n in names)
    assert fm["model-index"][0]["name"] == 'a "quoted": name'
    assert all(not (isinstance(m["value"], float) and math.isnan(m["value"]))
               for m in fm["model-index"][0]["results"][0]["metrics"])


def test_card_path():
    from pathlib import Path

    assert card_path_for(Path("out/my-flowers.safetensors")) == Path("out/my-flowers.md")


def test_name_captions_and_the_generation_condition_are_spelled_out():
    def with_(name_mix, sample_condition):
        s = state()
        s["config"] = {**s["config"], "name_mix": name_mix,
                       "model": {**s["config"]["model"], "sample_condition": sample_condition}}
        return model_card(s, "generator.safetensors")

    card = with_(0.2, True)
    assert "| species-name captions in training | 20% of the training captions replaced" in card
    assert "(`--set name_mix=0.2`)" in card
    assert "| condition at generation | sampled per image from its seed" in card
    card = with_(0.0, False)
    assert "species-name captions" not in card
    assert "| condition at generation | the caption's mean" in card
