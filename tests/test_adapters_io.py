"""Adapter files: round trip, metadata, and every refused input (other base, newer format, wrong keys, corrupt)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file

from _peft_helpers import base, logits, perturb_trainable
from medico_peft import __version__
from medico_peft.adapters import FORMAT_VERSION, inspect_adapter, load_adapter, save_adapter
from medico_peft.errors import AdapterError
from medico_peft.tuners import PeftConfig, inject, is_injected


def _trained(family="vit_tiny", **cfg):
    model = inject(base(family), PeftConfig(**cfg))
    perturb_trainable(model)
    return model


def _rewrite(src, dst, metadata=None, tensors=None):
    with safe_open(str(src), framework="pt") as h:
        meta = dict(h.metadata())
    meta.update(metadata or {})
    save_file(tensors if tensors is not None else load_file(str(src)), str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize("family,cfg", [
    ("vit_tiny", dict(method="lora", rank=4)),
    ("vit_tiny", dict(method="adapter", adapter_kind="sequential", train_prompt_encoder=True)),
    ("litemedsam", dict(method="dora", targets=["v"], decoder_lora=True)),
])
def test_round_trip_restores_outputs_exactly(tmp_path, family, cfg):
    model = _trained(family, **cfg)
    path = save_adapter(model, tmp_path / "task.safetensors", extra_metadata={"dataset": "colin27"})
    tensors = load_file(str(path))
    assert set(tensors) == {k.replace(".default", "").replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
                            for k, p in model.named_parameters() if p.requires_grad}
    assert not any(".base_layer." in k or ".wrapped." in k for k in tensors)
    loaded = load_adapter(base(family), path)
    assert torch.equal(logits(loaded), logits(model))
    info = inspect_adapter(path)
    assert info["format_version"] == FORMAT_VERSION == 1 and info["method"] == cfg["method"]
    assert info["base_sha256"] == model.base_sha256 and info["library_version"] == __version__
    assert info["extra"] == {"dataset": "colin27"} and info["base_model"] == family and info["created"]
    assert info["parameters"] == sum(t.numel() for t in tensors.values())


def test_file_holds_only_trained_tensors(tmp_path):
    path = save_adapter(_trained(rank=4, train_decoder=False), tmp_path / "a.safetensors")
    tensors = load_file(str(path))
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == 4 * 2 * (4 * 64 + 64 * 4)  # 4 blocks x (q, v)


def test_other_base_is_refused_unless_forced(tmp_path):
    model = _trained()
    path = save_adapter(model, tmp_path / "a.safetensors")
    other = base("vit_tiny")
    with torch.no_grad():
        other.image_encoder.blocks[0].mlp.lin1.weight.add_(1.0)
    from medico_peft.utils.hashing import sha256_state_dict

    other.base_sha256 = sha256_state_dict(other.state_dict())
    with pytest.raises(AdapterError, match=f"sha256 {model.base_sha256}, but this base has sha256 {other.base_sha256}"):
        load_adapter(other, path)
    assert not is_injected(other)
    assert is_injected(load_adapter(other, path, force=True))
    with pytest.raises(AdapterError, match="made for a vit_tiny base, this model is a litemedsam"):
        load_adapter(base("litemedsam"), path, force=True)


def test_newer_format_and_foreign_files_are_refused(tmp_path):
    path = save_adapter(_trained(), tmp_path / "a.safetensors")
    newer = _rewrite(path, tmp_path / "newer.safetensors", {"format_version": "3"})
    # version 2 is the semantic-adapter format (adapters/semantic.py), which this library reads
    with pytest.raises(AdapterError, match="format version 3 is newer than this medico_peft .* upgrade"):
        load_adapter(base("vit_tiny"), newer)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(AdapterError, match="not a medico_peft adapter file"):
        inspect_adapter(plain)
    bad_cfg = _rewrite(path, tmp_path / "badcfg.safetensors", {"config": json.dumps({"method": "prefix"})})
    with pytest.raises(AdapterError, match="metadata 'config' is invalid: method: unknown method 'prefix'"):
        load_adapter(base("vit_tiny"), bad_cfg)


def test_wrong_or_missing_keys_are_refused_and_model_left_unchanged(tmp_path):
    path = save_adapter(_trained(rank=4), tmp_path / "a.safetensors")
    tensors = load_file(str(path))
    missing = dict(tensors)
    dropped = sorted(missing)[0]
    del missing[dropped]
    model = base("vit_tiny")
    keys, ref = set(model.state_dict()), logits(model)
    with pytest.raises(AdapterError, match=r"1 missing \(e\.g\. " + dropped.replace(".", r"\.")):
        load_adapter(model, _rewrite(path, tmp_path / "m.safetensors", tensors=missing))
    assert not is_injected(model) and set(model.state_dict()) == keys
    assert torch.equal(logits(model), ref)  # decoder weights restored too
    extra = dict(tensors, **{"image_encoder.blocks.0.attn.qkv.k.lora_A.weight": torch.zeros(4, 64)})
    with pytest.raises(AdapterError, match="1 unexpected"):
        load_adapter(model, _rewrite(path, tmp_path / "u.safetensors", tensors=extra))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    wrong = dict(tensors, **{key: torch.zeros(8, 64)})
    with pytest.raises(AdapterError, match=r"of another shape .* file \(8, 64\), model \(4, 64\)"):
        load_adapter(model, _rewrite(path, tmp_path / "w.safetensors", tensors=wrong))


def test_corrupt_truncated_and_missing_files(tmp_path):
    path = save_adapter(_trained(), tmp_path / "a.safetensors")
    data = path.read_bytes()
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\x00\x01not safetensors at all")
    for bad in (truncated, garbage):
        with pytest.raises(AdapterError, match="not a readable safetensors file, truncated or corrupt"):
            load_adapter(base("vit_tiny"), bad)
    with pytest.raises(AdapterError, match="adapter file not found"):
        inspect_adapter(tmp_path / "none.safetensors")


def test_save_refusals_write_nothing(tmp_path):
    with pytest.raises(AdapterError, match="has no PEFT config"):
        save_adapter(base("vit_tiny"), tmp_path / "a.safetensors")
    with pytest.raises(AdapterError, match="use a name ending in .safetensors"):
        save_adapter(_trained(), tmp_path / "a.pt")
    assert list(tmp_path.iterdir()) == []
