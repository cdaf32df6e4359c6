"""Every file the CLI reads, broken every way we can think of, gives exit 2 and one `error:` line.

For each loader the CLI exposes (model checkpoints, adapter files, HF peft directories, training
checkpoints, manifests, shards, ONNX and TensorRT export folders, images) the file is replaced by:
an empty file, text, random bytes, the valid file truncated at several offsets, and valid files of
the wrong kind. The real CLI must exit 2 with exactly one `error:` line on stderr that names the
file, print no traceback, and write nothing in its output folder. Valid files are built once per
module from vit_tiny (random weights) and a one-volume shard set.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from medico_peft.cli import main
from medico_peft.errors import MedicoPeftError

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny_cpu.yaml"
TEXT = b"this is a text file, not what you think it is\n"


def _rng_bytes(n=4096, seed=0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """The valid files, built once: {name: path}."""
    from safetensors.torch import save_file

    from medico_peft.adapters import export_peft_dir, save_adapter
    from medico_peft.data.convert import convert
    from medico_peft.data.pairing import pair_by_stem
    from medico_peft.models import load_model, save_model
    from medico_peft.runtime.artifacts import read_sidecar, write_sidecar
    from medico_peft.training.checkpointing import save_checkpoint
    from medico_peft.tuners import PeftConfig, inject
    from test_data_synthetic import make_nifti_dataset

    d = tmp_path_factory.mktemp("valid")
    v = {}
    model = load_model("vit_tiny")
    v["pth"] = save_model(model, d / "model.pth")
    v["safetensors"] = save_model(model, d / "model.safetensors")
    lora = load_model("vit_tiny")
    inject(lora, PeftConfig(method="lora", rank=2))
    v["adapter"] = save_adapter(lora, d / "adapter.safetensors")
    v["peft"] = export_peft_dir(lora, d / "peft")
    v["latest"] = save_checkpoint(d / "latest.pt", {"trainable": {"w": torch.zeros(3)}, "history": []})
    dirs = make_nifti_dataset(d / "nii", n_volumes=1, shape=(32, 32, 4))
    convert(pair_by_stem(*dirs), d / "shards", size=128, split="test", progress=False)
    v["manifest"] = d / "shards" / "manifest.json"
    v["shard"] = next((d / "shards").glob("*.h5"))
    from medico_peft.export.onnx_export import export_onnx

    export_onnx(model, d / "onnx", parity_random=1, parity_real=0)
    v["onnx"] = d / "onnx"
    trt = d / "trt"
    trt.mkdir()
    for part in ("encoder", "decoder"):
        (trt / f"{part}.engine").write_bytes(b"engine")
    write_sidecar(trt / "engine.json", {"onnx": read_sidecar(d / "onnx" / "export.json"), "profiles": {},
                                        "tensorrt_version": "10.0.0", "gpu_name": "none",
                                        "compute_capability": [0, 0]})
    v["trt"] = trt
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48), dtype=np.uint8)).save(d / "image.png")
    v["png"] = d / "image.png"
    np.save(d / "image.npy", np.random.default_rng(0).normal(size=(40, 48)).astype(np.float32))
    v["npy"] = d / "image.npy"
    v["nii"] = next(Path(dirs[0]).glob("*.nii.gz"))
    import tifffile

    tifffile.imwrite(d / "image.tif", np.zeros((40, 48), np.uint16))
    v["tif"] = d / "image.tif"
    # valid files of the wrong kind
    w = d / "wrong"
    w.mkdir()
    torch.save([1, 2, 3], w / "list.pth")
    torch.save({"encoder.weight": torch.zeros(2)}, w / "foreign.pth")
    save_file({"foo.weight": torch.zeros(2)}, str(w / "foreign.safetensors"))
    save_file({"image_encoder.patch_embed.proj.weight": torch.zeros(4, 3, 16, 16)}, str(w / "partial.safetensors"))
    save_file({"image_encoder.pos_embed": torch.zeros(1, 8, 8, 32)},
              str(w / "badspec.safetensors"), metadata={"medico_peft.spec": "{not json"})
    save_file({"image_encoder.pos_embed": torch.zeros(1, 8, 8, 32)}, str(w / "listspec.safetensors"),
              metadata={"medico_peft.spec": "[1, 2]"})
    v["wrong"] = w
    return v


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        shutil.rmtree(path)
    path.write_bytes(data)
    return path


def _corruptions(valid_bytes: bytes) -> dict[str, bytes]:
    n = len(valid_bytes)
    end = len(valid_bytes.rstrip())  # a cut that only drops trailing whitespace leaves a valid JSON file
    cuts = sorted({min(10, n - 1), n // 3, (2 * n) // 3, end - 1})
    out = {"empty": b"", "text": TEXT, "random": _rng_bytes()}
    out.update({f"truncated{c}": valid_bytes[:c] for c in cuts})
    return out


def _run_cli(argv, capsys):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.err


def _assert_one_clean_error(code, err, names, out: Path | None, case: str = ""):
    assert code == 2, f"{case}: exit {code}, stderr: {err}"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert any(str(n) in lines[0] for n in names), f"{lines[0]!r} names none of {names}"
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), f"{out} was written: {list(out.iterdir())}"


# --- model checkpoints -----------------------------------------------------------------------------
def _checkpoint_argv(cmd, ckpt, valid, out):
    if cmd == "info":
        return ["info", "--model", "vit_tiny", "--checkpoint", ckpt]
    if cmd == "evaluate":
        return ["evaluate", "--model", "vit_tiny", "--checkpoint", ckpt, "--manifest", valid["manifest"],
                "--out", out, "--no-progress", "--max-slices", "1", "--clicks", "1"]
    if cmd == "predict":
        return ["predict", "--checkpoint", ckpt, "--image", valid["png"], "--box", 2, 2, 20, 20, "--out", out]
    if cmd == "export":
        return ["export", "onnx", "--checkpoint", ckpt, "--out", out, "--parity-images", "1", "--real-images", "0"]
    return ["adapter", "merge", "--checkpoint", ckpt, "--adapter", valid["adapter"], "--out", out / "m.safetensors"]


CKPT_COMMANDS = ["info", "evaluate", "predict", "export", "merge"]


def _checkpoint_cases(valid, suffix):
    cases = _corruptions(valid[suffix].read_bytes())
    w = valid["wrong"]
    if suffix == "pth":
        cases.update({"list": (w / "list.pth").read_bytes(), "foreign_keys": (w / "foreign.pth").read_bytes(),
                      "safetensors_named_pth": valid["safetensors"].read_bytes()})
    else:
        cases.update({k: (w / f"{k}.safetensors").read_bytes() for k in ("foreign", "partial", "badspec", "listspec")})
        cases["pth_named_safetensors"] = valid["pth"].read_bytes()
    return cases


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
@pytest.mark.parametrize("cmd", CKPT_COMMANDS)
def test_model_checkpoint(valid, tmp_path, capsys, cmd, suffix):
    for case, data in _checkpoint_cases(valid, suffix).items():
        ckpt = _write(tmp_path / case / f"model.{suffix}", data)
        out = tmp_path / case / "out"
        code, err = _run_cli(_checkpoint_argv(cmd, ckpt, valid, out), capsys)
        _assert_one_clean_error(code, err, [ckpt], out, case)


def test_checkpoint_that_is_a_folder(valid, tmp_path, capsys):
    code, err = _run_cli(["info", "--checkpoint", tmp_path], capsys)
    _assert_one_clean_error(code, err, [tmp_path], None, "folder")


# --- adapter files -----------------------------------------------------------------------------------
def _adapter_variants(valid):
    from safetensors.torch import load_file, save_file

    cases = _corruptions(valid["adapter"].read_bytes())
    cases["model_checkpoint"] = valid["safetensors"].read_bytes()
    cases["torch_pth"] = valid["pth"].read_bytes()
    tensors = load_file(str(valid["adapter"]))
    from safetensors import safe_open

    with safe_open(str(valid["adapter"]), framework="pt") as h:
        meta = dict(h.metadata())
    tmp = valid["wrong"]
    for name, patch in {"spec_list": {"base_spec": "[1]"}, "config_list": {"config": "[1]"},
                        "config_text": {"config": "lora"}, "extra_list": {"extra": "[1]"},
                        "version_text": {"format_version": "one"}, "no_spec": {"base_spec": None}}.items():
        m = {k: v for k, v in {**meta, **patch}.items() if v is not None}
        save_file(tensors, str(tmp / f"adapter_{name}.safetensors"), metadata=m)
        cases[name] = (tmp / f"adapter_{name}.safetensors").read_bytes()
    save_file({"foo": torch.zeros(2)}, str(tmp / "adapter_foreign.safetensors"), metadata=meta)
    cases["foreign_tensors"] = (tmp / "adapter_foreign.safetensors").read_bytes()
    return cases


ADAPTER_COMMANDS = ["inspect", "evaluate", "predict", "export", "merge"]


def _adapter_argv(cmd, adapter, valid, out):
    model = ["--model", "vit_tiny", "--checkpoint", valid["safetensors"]]
    if cmd == "inspect":
        return ["adapter", "inspect", adapter]
    if cmd == "evaluate":
        return ["evaluate", *model, "--adapter", adapter, "--manifest", valid["manifest"], "--out", out,
                "--no-progress", "--max-slices", "1", "--clicks", "1"]
    if cmd == "predict":
        return ["predict", *model, "--adapter", adapter, "--image", valid["png"], "--box", 2, 2, 20, 20, "--out", out]
    if cmd == "export":
        return ["export", "onnx", *model, "--adapter", adapter, "--out", out, "--parity-images", "1",
                "--real-images", "0"]
    return ["adapter", "merge", *model, "--adapter", adapter, "--out", out / "m.safetensors"]


@pytest.mark.parametrize("cmd", ADAPTER_COMMANDS)
def test_adapter_file(valid, tmp_path, capsys, cmd):
    for case, data in _adapter_variants(valid).items():
        if cmd == "inspect" and case == "foreign_tensors":
            continue  # inspect reports what the file holds; the tensors are checked against a model on load
        adapter = _write(tmp_path / case / "adapter.safetensors", data)
        out = tmp_path / case / "out"
        code, err = _run_cli(_adapter_argv(cmd, adapter, valid, out), capsys)
        _assert_one_clean_error(code, err, [adapter], out, case)


# --- HF peft directories (library: no CLI command imports them) ------------------------------------
def test_peft_directory(valid, tmp_path):
    from medico_peft.adapters import import_peft_dir
    from medico_peft.adapters.hf_format import CONFIG_NAME, WEIGHTS_NAME
    from medico_peft.models import load_model

    base = load_model("vit_tiny")
    cases = []
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        good = (valid["peft"] / name).read_bytes()
        variants = _corruptions(good)
        variants["json_list"] = b"[1, 2]"
        variants["other_json"] = json.dumps({"peft_type": "PREFIX_TUNING"}).encode()
        variants["model_checkpoint"] = valid["safetensors"].read_bytes()
        cases += [(name, case, data) for case, data in variants.items()]
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(valid["peft"] / WEIGHTS_NAME))
    for key, value in {"spec_list": "[1]", "config_list": "[1]"}.items():
        meta = {"format": "pt", "medico_peft.config": "{}", "medico_peft.base_spec": "{}"}
        meta["medico_peft." + ("base_spec" if key == "spec_list" else "config")] = value
        save_file(tensors, str(tmp_path / "w.safetensors"), metadata=meta)
        cases.append((WEIGHTS_NAME, key, (tmp_path / "w.safetensors").read_bytes()))
    for name, case, data in cases:
        if name == CONFIG_NAME and case == "other_json":
            continue  # a readable config is not checked further: ours rides in the weights' metadata
        folder = tmp_path / case / name.split(".")[0]
        shutil.copytree(valid["peft"], folder)
        _write(folder / name, data)
        with pytest.raises(MedicoPeftError) as info:
            import_peft_dir(base, folder)
        assert str(folder) in str(info.value), (case, name, info.value)
        assert "\n" not in str(info.value)


# --- training checkpoints (train --resume) ----------------------------------------------------------
def _train_argv(out, *extra):
    return ["train", "--config", TINY, f"output.dir={out}", "output.progress=false", "data.synthetic=4",
            "train.epochs=1", *extra]


@pytest.mark.slow
def test_training_checkpoint_resume(valid, tmp_path, capsys):
    cases = _corruptions(valid["latest"].read_bytes())
    cases["list"] = (valid["wrong"] / "list.pth").read_bytes()
    cases["model_state_dict"] = valid["pth"].read_bytes()
    from medico_peft.training.checkpointing import save_checkpoint

    save_checkpoint(tmp_path / "x.pt", {"global_step": 3})
    cases["missing_keys"] = (tmp_path / "x.pt").read_bytes()
    save_checkpoint(tmp_path / "x.pt", {"trainable": [1], "optimizer": {}, "scheduler": {}, "scaler": {},
                                        "rng": {}, "history": []})
    cases["wrong_types"] = (tmp_path / "x.pt").read_bytes()
    for case, data in cases.items():
        out = tmp_path / case
        latest = _write(out / "latest.pt", data)
        code, err = _run_cli(_train_argv(out, "--resume"), capsys)
        _assert_one_clean_error(code, err, [latest], None, case)
        assert sorted(p.name for p in out.iterdir()) == ["latest.pt"] and latest.read_bytes() == data, case


# --- manifests and shards -----------------------------------------------------------------------------
def _manifest_variants(valid):
    good = valid["manifest"].read_bytes()
    data = json.loads(good)
    cases = _corruptions(good)
    cases["json_list"] = b"[1, 2, 3]"
    cases["other_format"] = json.dumps({"format": "coco", "images": []}).encode()
    cases["adapter_config"] = (valid["peft"] / "adapter_config.json").read_bytes()
    cases["export_sidecar"] = (valid["onnx"] / "export.json").read_bytes()
    for name, patch in {"label_names_text": {"label_names": {"liver": "1"}},
                        "shards_dicts": {"shards": [1, 2]},
                        "shard_file_int": {"shards": [{**data["shards"][0], "file": 3}]},
                        "image_size_text": {"image_size": "64"},
                        "version_text": {"format_version": "1"},
                        "missing_shard": {"shards": [{**data["shards"][0], "file": "nope.h5"}]}}.items():
        cases[name] = json.dumps({**data, **patch}).encode()
    return cases


@pytest.mark.parametrize("cmd", ["evaluate", "train"])
def test_manifest(valid, tmp_path, capsys, cmd):
    for case, data in _manifest_variants(valid).items():
        folder = tmp_path / case
        shutil.copytree(valid["manifest"].parent, folder)
        manifest = _write(folder / "manifest.json", data)
        out = tmp_path / f"{case}_out"
        if cmd == "evaluate":
            argv = ["evaluate", "--model", "vit_tiny", "--manifest", manifest, "--out", out, "--no-progress",
                    "--max-slices", "1", "--clicks", "1"]
        else:
            argv = _train_argv(out, "data.synthetic=0", f"data.manifest={manifest}")
        code, err = _run_cli(argv, capsys)
        _assert_one_clean_error(code, err, [manifest], out, case)


def _shard_variants(valid, tmp_path):
    import h5py

    cases = _corruptions(valid["shard"].read_bytes())
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["data"] = np.zeros(3)
    cases["other_hdf5"] = (tmp_path / "other.h5").read_bytes()
    shutil.copy(valid["shard"], tmp_path / "attrs.h5")
    with h5py.File(tmp_path / "attrs.h5", "a") as f:
        f.attrs["format_version"] = "one"
    cases["format_version_text"] = (tmp_path / "attrs.h5").read_bytes()
    cases["model_checkpoint"] = valid["pth"].read_bytes()
    return cases


@pytest.mark.parametrize("cmd", ["evaluate", "train"])
def test_shard(valid, tmp_path, capsys, cmd):
    for case, data in _shard_variants(valid, tmp_path).items():
        folder = tmp_path / case
        shutil.copytree(valid["manifest"].parent, folder)
        shard = _write(folder / valid["shard"].name, data)
        manifest = json.loads(valid["manifest"].read_text())
        manifest["shards"][0].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))  # past verify
        (folder / "manifest.json").write_text(json.dumps(manifest))
        out = tmp_path / f"{case}_out"
        if cmd == "evaluate":
            argv = ["evaluate", "--model", "vit_tiny", "--manifest", folder, "--split", "test", "--out", out,
                    "--no-progress", "--max-slices", "1", "--clicks", "1"]
        else:
            argv = _train_argv(out, "data.synthetic=0", f"data.manifest={folder}", "data.train_split=test",
                               "data.val_split=test")
        code, err = _run_cli(argv, capsys)
        _assert_one_clean_error(code, err, [shard], out, case)


# --- ONNX and TensorRT export folders --------------------------------------------------------------------
def _sidecar_variants(good: bytes) -> dict[str, bytes]:
    data = json.loads(good)
    cases = _corruptions(good)
    cases["json_list"] = b"[1]"
    cases["empty_object"] = b"{}"
    cases["adapter_config"] = json.dumps({"peft_type": "LORA", "r": 4}).encode()
    for key in ("model", "io", "files", "mask_outputs", "onnx", "profiles"):
        if key in data:
            cases[f"no_{key}"] = json.dumps({k: v for k, v in data.items() if k != key}).encode()
    cases["version_text"] = json.dumps({**data, "format_version": "one"}).encode()
    if "mask_outputs" in data:
        cases["mask_outputs_bad"] = json.dumps({**data, "mask_outputs": "some"}).encode()
    return cases


def test_onnx_folder(valid, tmp_path, capsys):
    import onnx

    cases = [("export.json", case, data) for case, data in _sidecar_variants((valid["onnx"] / "export.json")
                                                                             .read_bytes()).items()]
    for part in ("encoder.onnx", "decoder.onnx"):
        variants = _corruptions((valid["onnx"] / part).read_bytes())
        other = "decoder.onnx" if part == "encoder.onnx" else "encoder.onnx"
        variants["other_graph"] = (valid["onnx"] / other).read_bytes()
        variants["empty_graph"] = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])).SerializeToString()
        variants["model_checkpoint"] = valid["pth"].read_bytes()
        cases += [(part, case, data) for case, data in variants.items()]
    for name, case, data in cases:
        folder = tmp_path / name.split(".")[0] / case
        shutil.copytree(valid["onnx"], folder)
        target = _write(folder / name, data)
        out = tmp_path / "out" / name / case
        code, err = _run_cli(["predict", "--backend", "onnxruntime", "--onnx", folder, "--image", valid["png"],
                              "--box", 2, 2, 20, 20, "--out", out], capsys)
        _assert_one_clean_error(code, err, [target], out, case)


def test_tensorrt_folder_sidecar_is_checked_before_tensorrt(valid, tmp_path, capsys):
    for case, data in _sidecar_variants((valid["trt"] / "engine.json").read_bytes()).items():
        folder = tmp_path / case
        shutil.copytree(valid["trt"], folder)
        target = _write(folder / "engine.json", data)
        out = tmp_path / "out" / case
        code, err = _run_cli(["predict", "--backend", "tensorrt", "--engine", folder, "--image", valid["png"],
                              "--box", 2, 2, 20, 20, "--out", out], capsys)
        _assert_one_clean_error(code, err, [target], out, case)


# --- images for predict ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["png", "npy", "nii", "tif"])
def test_image(valid, tmp_path, capsys, kind):
    suffix = ".nii.gz" if kind == "nii" else f".{kind}"
    cases = _corruptions(valid[kind].read_bytes())
    cases["model_checkpoint"] = valid["pth"].read_bytes()
    if kind == "npy":
        for name, arr in {"1d": np.zeros(7), "4d": np.zeros((2, 2, 2, 2)), "strings": np.array(["a", "b"]),
                          "empty": np.zeros((0, 5)), "complex": np.zeros((8, 8), np.complex64)}.items():
            np.save(tmp_path / "a.npy", arr)
            cases[name] = (tmp_path / "a.npy").read_bytes()
    for case, data in cases.items():
        image = _write(tmp_path / case / f"image{suffix}", data)
        out = tmp_path / case / "out"
        code, err = _run_cli(["predict", "--model", "vit_tiny", "--image", image, "--box", 2, 2, 20, 20,
                              "--out", out], capsys)
        _assert_one_clean_error(code, err, [image], out, case)


# --- the real process: no traceback on stderr ----------------------------------------------------------------
@pytest.mark.parametrize("argv_kind", ["checkpoint_text", "manifest_list"])
def test_subprocess_has_one_error_line_and_no_traceback(valid, tmp_path, argv_kind):
    if argv_kind == "checkpoint_text":
        bad = _write(tmp_path / "model.pth", TEXT)
        argv = ["info", "--checkpoint", str(bad)]
    else:
        bad = _write(tmp_path / "manifest.json", b"[1, 2]")
        argv = ["evaluate", "--model", "vit_tiny", "--manifest", str(bad), "--out", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "medico_peft.cli", *argv], capture_output=True, text=True,
                          env=env, timeout=120)
    _assert_one_clean_error(proc.returncode, proc.stderr, [bad], tmp_path / "out")
