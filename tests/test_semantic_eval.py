"""`evaluate_semantic` / `medico-peft evaluate --semantic`: per-class 2D and 3D Dice, confusion summary, report
files, refusals. Scores are checked with oracles (known answers) and against an independent recomputation
with the training metric (`evaluation.semantic_metrics.class_counts`)."""

from __future__ import annotations

import csv
import hashlib
import json
import math

import numpy as np
import pytest
import torch

from _semantic_helpers import CLASSES, convert_volumes, save_tiny_adapter, tiny_semantic
from medico_peft.cli import main
from medico_peft.errors import ConfigError
from medico_peft.evaluation.semantic import evaluate_semantic
from medico_peft.models.semantic import SemanticSam


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("semeval")
    return str(convert_volumes(root / "src", root / "shards"))


def _slices(manifest):
    from medico_peft.data.dataset import iter_eval_slices

    return list(iter_eval_slices(manifest, split="test", skip_empty=False))


def _key(image: torch.Tensor) -> str:
    return hashlib.sha256(image.numpy().tobytes()).hexdigest()


class Oracle(SemanticSam):
    """Answers each slice with its truth (class indices through `relabel`), as one-hot logits."""

    def __init__(self, manifest, relabel=(0, 1, 2)):
        base = tiny_semantic("samed")
        super().__init__(base.sam, base.head, base.kind, base.num_classes, base.class_names)
        self.class_table = base.class_table
        self.truth = {}
        for item in _slices(manifest):
            cls = self.class_table.apply(item["label_map"].numpy())
            self.truth[_key(item["image"])] = np.asarray(relabel)[cls]

    def forward(self, images):
        out = []
        for img in images:
            t = torch.from_numpy(self.truth[_key(img)])
            out.append(torch.nn.functional.one_hot(t, self.num_classes).permute(2, 0, 1).float() * 10)
        return torch.stack(out)


def test_oracle_scores_one_and_the_confusion_is_diagonal(manifest, tmp_path):
    res = evaluate_semantic(Oracle(manifest), manifest, out_dir=tmp_path / "eval", progress=False, n_overlays=2)
    assert res.volumetric and res.n_volumes == 2 and res.n_slices == len(_slices(manifest))
    assert [r["class_name"] for r in res.per_class] == list(CLASSES[1:])
    for row in res.per_class:
        assert row["dice_2d"] == 1.0 and row["dice_3d"] == 1.0 and row["false_positive_slices"] == 0
        assert row["slices_scored"] == row["slices_with_class"] > 0 and row["volumes_scored"] == 2
    np.testing.assert_array_equal(res.confusion_fractions, np.eye(3))
    assert res.mean_dice_2d == res.mean_dice_3d == 1.0


def test_swapped_classes_score_zero_and_show_in_the_confusion(manifest):
    res = evaluate_semantic(Oracle(manifest, relabel=(0, 2, 1)), manifest, progress=False, n_overlays=0)
    assert all(r["dice_2d"] == 0.0 and r["dice_3d"] == 0.0 for r in res.per_class)
    frac = res.confusion_fractions
    assert frac[1, 2] == frac[2, 1] == 1.0 and frac[0, 0] == 1.0
    text = (res.per_class[0]["class_name"], res.per_class[1]["class_name"])
    assert text == ("ball_a", "ball_b")


def test_random_model_matches_an_independent_recomputation(manifest):
    """Per-slice and per-volume Dice recomputed from the model's logits with the training metric."""
    from medico_peft.evaluation.semantic_metrics import class_counts, dice_from_counts

    model = tiny_semantic("unetr", seed=5)
    res = evaluate_semantic(model, manifest, progress=False, n_overlays=0, batch_size=3)
    per_slice = {k: [] for k in range(1, 3)}
    per_volume: dict[str, torch.Tensor] = {}
    confusion = np.zeros((3, 3), np.int64)
    with torch.no_grad():
        for item in _slices(manifest):
            h, w = item["input_size"]
            pred = model(item["image"][None]).argmax(1)[0, :h, :w]
            truth = torch.from_numpy(model.class_table.apply(item["label_map"][:h, :w].numpy()))
            counts = class_counts(pred, truth, 3)
            per_volume[item["volume_id"]] = per_volume.get(item["volume_id"], 0) + counts
            for k, d in enumerate(dice_from_counts(counts)):
                if k and not math.isnan(d):
                    per_slice[k].append(d)
            np.add.at(confusion, (truth.numpy().ravel(), pred.numpy().ravel()), 1)
    for row in res.per_class:
        k = row["class_index"]
        assert row["dice_2d"] == pytest.approx(np.mean(per_slice[k]), abs=1e-12)
        vol = [dice_from_counts(c)[k] for c in per_volume.values()]
        assert row["dice_3d"] == pytest.approx(np.nanmean(vol), abs=1e-12)
    np.testing.assert_array_equal(res.confusion, confusion)
    assert 0.0 <= res.mean_dice_2d <= 1.0


def test_report_files_and_the_overwrite_rule(manifest, tmp_path):
    out = tmp_path / "eval"
    res = evaluate_semantic(Oracle(manifest, relabel=(0, 2, 1)), manifest, out_dir=out, progress=False,
                            n_overlays=2, max_slices=5)
    names = sorted(p.name for p in out.iterdir())
    assert names == ["confusion.csv", "confusion.png", "overlay_00.png", "overlay_01.png", "per_class.csv",
                     "per_slice.csv", "summary.json", "summary.md"]
    summary = (out / "summary.md").read_text()
    assert "| 1 ball_a | 0.000 |" in summary and "## Confusion summary" in summary and "2 ball_b" in summary
    with open(out / "per_class.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["class_name"] for r in rows] == ["ball_a", "ball_b"] and "dice_3d" in rows[0]
    data = json.loads((out / "summary.json").read_text())
    assert data["n_slices"] == res.n_slices == 5 and data["confusion_fractions"][1][2] == 1.0
    from PIL import Image

    with Image.open(out / "overlay_00.png") as im:
        assert im.size[0] > 600  # three panels and a legend
    before = (out / "summary.md").read_bytes()
    with pytest.raises(ConfigError, match="not empty .*--overwrite"):
        evaluate_semantic(Oracle(manifest), manifest, out_dir=out, progress=False)
    assert (out / "summary.md").read_bytes() == before
    evaluate_semantic(Oracle(manifest), manifest, out_dir=out, overwrite=True, progress=False, n_overlays=0)
    assert "| 1 ball_a | 1.000 |" in (out / "summary.md").read_text()
    assert not (out / "overlay_00.png").exists()  # files of the old report are not mixed in


def test_two_d_shards_have_no_three_d_dice(tmp_path):
    from medico_peft.data.convert import convert
    from medico_peft.data.labels import LabelSelection
    from test_data_synthetic import make_volume

    imgs, labs = tmp_path / "imgs", tmp_path / "labs"
    imgs.mkdir()
    labs.mkdir()
    for i in range(2):
        image, label = make_volume((1, 60, 50), seed=i)
        np.save(imgs / f"c{i}.npy", image[0])
        np.save(labs / f"c{i}.npy", label[0])
    (tmp_path / "names.txt").write_text("1 ball_a\n2 ball_b\n")
    from medico_peft.data.pairing import pair_by_stem

    rep = convert(pair_by_stem(imgs, labs), tmp_path / "sh", size=128, split="test", min_area=0, modality="other",
                  labels=LabelSelection(names_file=str(tmp_path / "names.txt")), progress=False)
    res = evaluate_semantic(tiny_semantic("samed"), rep.manifest_path, progress=False, n_overlays=0)
    assert not res.volumetric and res.mean_dice_3d is None and "dice_3d" not in res.per_class[0]


def test_refusals_name_the_problem(manifest, tmp_path):
    from medico_peft.data.classes import ClassTable
    from medico_peft.models import load_model

    model = tiny_semantic("samed")
    with pytest.raises(ConfigError, match="head predicts 3 classes .* class table has 4"):
        evaluate_semantic(model, manifest, class_table={"names": ["background", "ball_a", "ball_b", "x"],
                                                        "source_ids": [[], [1], [2], [3]]}, progress=False)
    with pytest.raises(ConfigError, match=r"label id\(s\) \[7\] of the model's class table are not in the shards"):
        evaluate_semantic(model, manifest, class_table=ClassTable(CLASSES, ((), (1,), (7,))), progress=False)
    with pytest.raises(ConfigError, match="expected a semantic model"):
        evaluate_semantic(load_model("vit_tiny"), manifest, progress=False)
    model.class_table = None
    model.class_names = ["background", "ball_a", "thalamus"]
    model.num_classes = 3
    with pytest.raises(ConfigError, match=r"classes \['thalamus'\] are not label names .* carries no class table"):
        evaluate_semantic(model, manifest, progress=False)
    with pytest.raises(ConfigError, match="max_slices: 0 should be an int >= 1"):
        evaluate_semantic(tiny_semantic("samed"), manifest, max_slices=0, progress=False)
    assert not any(tmp_path.iterdir())


def test_cli_evaluate_semantic(manifest, tmp_path, capsys):
    adapter = save_tiny_adapter(tiny_semantic("unetr", seed=2), tmp_path / "sem.safetensors")
    out = tmp_path / "eval"
    args = ["evaluate", "--semantic", "--model", "vit_tiny", "--adapter", str(adapter), "--manifest", manifest,
            "--out", str(out), "--max-slices", "4", "--overlays", "1", "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "4 slices, 2 classes: mean Dice 2D" in printed and ", 3D " in printed
    assert (out / "summary.md").exists() and (out / "overlay_00.png").exists()
    assert main(args) == 2 and "not empty" in capsys.readouterr().err
    # an interactive adapter is refused for --semantic, nothing written
    from medico_peft.adapters import save_adapter
    from medico_peft.models import load_model
    from medico_peft.tuners import PeftConfig, inject

    inter = save_adapter(inject(load_model("vit_tiny"), PeftConfig(method="lora", rank=2)), tmp_path / "i.safetensors")
    args[args.index(str(adapter))] = str(inter)
    args[args.index(str(out))] = str(tmp_path / "eval2")
    assert main(args) == 2 and "interactive adapter" in capsys.readouterr().err
    assert not (tmp_path / "eval2").exists()
