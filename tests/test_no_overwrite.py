"""No silent data loss: commands refuse a non-empty --out without --overwrite; replacements are swapped in whole."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from _training_helpers import TINY
from medico_peft.cli import main
from medico_peft.data.convert import convert
from medico_peft.data.manifest import load_manifest
from medico_peft.data.pairing import pair_by_stem
from medico_peft.training import checkpointing as ckpt
from medico_peft.utils.paths import prepare_output_dir, staged_folder
from test_data_synthetic import make_nifti_dataset


@pytest.fixture(scope="module")
def nifti_dirs(tmp_path_factory):
    return make_nifti_dataset(tmp_path_factory.mktemp("nifti"), n_volumes=3)


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_refusal(capsys, folder) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    assert str(folder) in lines[0] and "--overwrite" in lines[0], lines[0]
    return lines[0]


def test_an_absent_or_empty_folder_needs_no_flag(tmp_path):
    (tmp_path / "empty").mkdir()
    assert prepare_output_dir(tmp_path / "empty", overwrite=False) == tmp_path / "empty"
    assert prepare_output_dir(tmp_path / "new", overwrite=False) == tmp_path / "new"
    assert not (tmp_path / "new").exists()  # the check creates nothing


def test_cli_convert_refuses_an_existing_set_and_replaces_it_with_overwrite(nifti_dirs, tmp_path, capsys):
    out = tmp_path / "shards"
    args = ["convert", "--images", str(nifti_dirs[0]), "--labels", str(nifti_dirs[1]), "--out", str(out),
            "--no-progress", "--size", "32"]
    assert main(args) == 0
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    assert main(args + ["--size", "48"]) == 2
    one_refusal(capsys, out)
    assert snapshot(out) == before
    assert main(args + ["--size", "48", "--overwrite"]) == 0
    assert load_manifest(out, verify=True).image_size == 48
    assert (out / "notes.txt").read_text() == "mine"  # not part of a shard set: kept
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]  # no staging folder left behind


def test_interrupted_reconversion_leaves_the_old_set_loadable(nifti_dirs, tmp_path, monkeypatch):
    from medico_peft.data.dataset import SliceDataset
    from medico_peft.data.shard_writer import ShardWriter

    pairs = pair_by_stem(*nifti_dirs)
    out = tmp_path / "shards"
    convert(pairs, out, size=32, split="train", progress=False)
    before = snapshot(out)
    real_add, added = ShardWriter.add, []

    def add_then_fail(self, sample):
        added.append(sample)
        if len(added) > 3:  # a few new one-sample shards are complete by now
            raise OSError("disk full")
        real_add(self, sample)

    monkeypatch.setattr(ShardWriter, "add", add_then_fail)
    with pytest.raises(OSError, match="disk full"):
        convert(pairs, out, size=48, split="train", max_samples_per_shard=1, progress=False)
    assert snapshot(out) == before
    manifest = load_manifest(out, verify=True)
    assert manifest.image_size == 32
    dataset = SliceDataset(out / "manifest.json", "train", augment=None)
    assert len(dataset) > 0 and dataset[0]["image"].shape[-1] == 32
    assert [p.name for p in tmp_path.iterdir()] == ["shards"]


def test_staged_export_folder_keeps_the_old_export_until_it_succeeds(tmp_path):
    from medico_peft.export.onnx_export import staging_folder

    out = tmp_path / "onnx"
    out.mkdir()
    for name, text in (("encoder.onnx", "old"), ("encoder.onnx.data", "old"), ("export.json", "old"),
                       ("README.txt", "mine")):
        (out / name).write_text(text)
    before = snapshot(out)
    with pytest.raises(RuntimeError), staging_folder(out) as stage:
        (stage / "encoder.onnx").write_text("new")
        raise RuntimeError("parity gate failed")
    assert snapshot(out) == before
    with staging_folder(out) as stage:
        (stage / "encoder.onnx").write_text("new")
        (stage / "export.json").write_text("new")
    # the stale external-data file of the old export is gone; the user's file stays
    assert snapshot(out) == {"README.txt": b"mine", "encoder.onnx": b"new", "export.json": b"new"}
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"]


def test_staged_folder_without_ownership_replaces_the_folder(tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with staged_folder(out) as stage:
        (stage / "new.txt").write_text("new")
    assert snapshot(out) == {"new.txt": b"new"}


@pytest.fixture
def image_png(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50), np.uint8)).save(path)
    return path


def test_commands_refuse_a_non_empty_out_without_overwrite(tmp_path, image_png, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "export.json").write_text("{}")
    (out / "mask.png").write_bytes(b"keep")
    before = snapshot(out)
    commands = [
        ["export", "onnx", "--model", "vit_tiny", "--out", str(out)],
        ["export", "tensorrt", "--onnx", str(tmp_path), "--out", str(out)],
        ["predict", "--model", "vit_tiny", "--image", str(image_png), "--box", "1", "1", "30", "30", "--out", str(out)],
        ["evaluate", "--model", "vit_tiny", "--manifest", str(tmp_path / "none"), "--out", str(out)],
        ["demo", "--out", str(out)],
    ]
    for argv in commands:
        assert main(argv) == 2, argv
        one_refusal(capsys, out)
        assert snapshot(out) == before, argv
    # With --overwrite the check passes (these two then stop at their next, unrelated error) ...
    for argv in commands[1:2] + commands[3:4]:
        main(argv + ["--overwrite"])
        assert "--overwrite" not in capsys.readouterr().err, argv
    assert snapshot(out) == before
    # ... and the ONNX export replaces the old export, keeping the file it does not own.
    assert main(commands[0] + ["--overwrite", "--parity-images", "1", "--real-images", "0"]) == 0
    assert (out / "encoder.onnx").is_file() and (out / "export.json").read_bytes() != b"{}"
    assert (out / "mask.png").read_bytes() == b"keep"


def test_predict_with_overwrite_writes_into_a_non_empty_folder(tmp_path, image_png):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mask.png").write_bytes(b"old")
    assert main(["predict", "--model", "vit_tiny", "--image", str(image_png), "--box", "1", "1", "30", "30",
                 "--out", str(out), "--overwrite"]) == 0
    assert np.asarray(Image.open(out / "mask.png")).shape == (40, 50)


def test_demo_with_overwrite_runs_and_lets_training_start_again(tmp_path, monkeypatch):
    from medico_peft.commands import demo

    out = tmp_path / "demo"
    out.mkdir()
    (out / "report.md").write_text("old")
    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: seen.update(k) or out / "report.md")
    assert main(["demo", "--out", str(out), "--overwrite", "--no-progress"]) == 0
    assert seen["overwrite"] is True


def test_adapter_merge_refuses_an_existing_file(tmp_path, capsys):
    target = tmp_path / "merged.safetensors"
    target.write_bytes(b"keep")
    argv = ["adapter", "merge", "--adapter", str(tmp_path / "none.safetensors"), "--out", str(target)]
    assert main(argv) == 2
    one_refusal(capsys, target)
    assert target.read_bytes() == b"keep"
    assert main(argv + ["--overwrite"]) == 2  # gets past the check, then the adapter is missing
    assert "--overwrite" not in capsys.readouterr().err


def test_prepare_run_dir_rules(tmp_path):
    from medico_peft.training.trainer import prepare_run_dir

    run = tmp_path / "run"
    assert prepare_run_dir(run) is False and prepare_run_dir(run, "auto") is False
    with pytest.raises(Exception, match="holds no latest.pt"):
        prepare_run_dir(run, True)
    run.mkdir()
    (run / "metrics.csv").write_text("epoch\n")
    (run / "best.pt").write_bytes(b"old")
    with pytest.raises(Exception, match="--overwrite"):
        prepare_run_dir(run)
    with pytest.raises(Exception, match="--overwrite"):
        prepare_run_dir(run, "auto")  # nothing to resume, and a run to lose
    assert prepare_run_dir(run, overwrite=True) is False
    assert not (run / "best.pt").exists() and not (run / "metrics.csv").exists()  # a stale best.pt must not win
    (run / ckpt.LATEST).write_bytes(b"x")
    assert prepare_run_dir(run, True) is True and prepare_run_dir(run, "auto") is True
    with pytest.raises(Exception, match="cannot be combined"):
        prepare_run_dir(run, True, overwrite=True)


def test_cli_train_resume_needs_a_checkpoint_and_a_finished_run_needs_a_flag(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--config", str(TINY), f"output.dir={run}", "output.progress=false", "train.epochs=1"]
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(run) in err[0] and "latest.pt" in err[0] and "--resume-if-possible" in err[0]
    assert not run.exists()

    assert main(args + ["--resume-if-possible"]) == 0  # nothing to resume: starts
    assert ckpt.load_checkpoint(run / ckpt.LATEST)["global_step"] == 4
    capsys.readouterr()
    before = snapshot(run)
    assert main(args) == 2  # a finished run is not silently replaced
    message = one_refusal(capsys, run)
    assert "--resume" in message
    assert snapshot(run) == before
    assert main(args + ["--resume-if-possible"]) == 0  # resumes: nothing left to do
    assert ckpt.load_checkpoint(run / ckpt.LATEST)["global_step"] == 4
    assert main(args + ["--overwrite"]) == 0
    assert ckpt.load_checkpoint(run / ckpt.LATEST)["global_step"] == 4
