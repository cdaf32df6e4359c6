"""The wrong-base refusal hashes the weights the model holds when the adapter is loaded, not the hash
cached at load time: weights changed in place afterwards (a tensor edited, `load_state_dict`, an
`unload` that keeps a decoder trained in place) are a different base."""

from __future__ import annotations

import hashlib
import re

import pytest
import torch

from _peft_helpers import base, perturb_trainable
from medico_peft.adapters import AdapterBank, export_peft_dir, import_peft_dir, load_adapter, save_adapter
from medico_peft.errors import AdapterError
from medico_peft.tuners import PeftConfig, inject, is_injected, unload
from medico_peft.utils.hashing import sha256_state_dict


def _adapter(tmp_path, name="a.safetensors", seed=1, **cfg):
    model = inject(base("vit_tiny"), PeftConfig(**(cfg or dict(method="lora", rank=4))))
    perturb_trainable(model, seed=seed)
    return save_adapter(model, tmp_path / name), model.base_sha256


def _refused(model, path, recorded):
    """load_adapter refuses, naming the file's hash and the hash of the weights there now."""
    now = sha256_state_dict(model.state_dict())
    assert now != recorded
    with pytest.raises(AdapterError) as info:
        load_adapter(model, path)
    msg = str(info.value)
    assert f"trained on base weights sha256 {recorded}, but this base has sha256 {now}" in msg
    assert "\n" not in msg and str(path) in msg
    assert not is_injected(model)
    assert is_injected(load_adapter(model, path, force=True))  # force still overrides


def test_weight_changed_in_place_after_loading_is_refused(tmp_path):
    path, recorded = _adapter(tmp_path)
    model = base("vit_tiny")
    assert model.base_sha256 == recorded
    with torch.no_grad():
        model.image_encoder.blocks[0].mlp.lin1.weight[0, 0] += 1e-3  # one weight
    assert model.base_sha256 == recorded  # the cache is stale ...
    with pytest.raises(AdapterError, match=re.escape(f"changed in place after they were loaded with sha256 {recorded}")):
        load_adapter(model, path)  # ... and is not what decides
    _refused(model, path, recorded)


def test_weights_replaced_by_load_state_dict_are_refused(tmp_path):
    path, recorded = _adapter(tmp_path)
    model = base("vit_tiny")
    other = base("vit_tiny")
    with torch.no_grad():
        other.mask_decoder.iou_token.weight.mul_(2.0)
    model.load_state_dict(other.state_dict())
    _refused(model, path, recorded)


def test_unload_keeping_a_decoder_trained_in_place_is_refused(tmp_path):
    path, recorded = _adapter(tmp_path)
    model = inject(base("vit_tiny"), PeftConfig(method="lora", rank=4, train_decoder=True))
    perturb_trainable(model, seed=5)  # "training" moves the decoder in place
    unload(model)  # removes LoRA, keeps the trained decoder
    _refused(model, path, recorded)


def test_unchanged_base_still_loads(tmp_path):
    path, recorded = _adapter(tmp_path)
    model = base("vit_tiny")
    model.base_sha256 = None  # the check does not need the cached value
    assert is_injected(load_adapter(model, path))


def test_peft_directory_import_checks_the_weights_there(tmp_path):
    model = inject(base("vit_tiny"), PeftConfig(method="lora", rank=4))
    perturb_trainable(model)
    directory = export_peft_dir(model, tmp_path / "peft")
    other = base("vit_tiny")
    with torch.no_grad():
        other.prompt_encoder.not_a_point_embed.weight.add_(0.1)
    with pytest.raises(AdapterError, match=f"sha256 {model.base_sha256}, but this base has sha256 "):
        import_peft_dir(other, directory)
    assert is_injected(import_peft_dir(other, directory, force=True))


def test_adapter_bank_checks_the_base_an_activation_runs_on(tmp_path):
    first, recorded = _adapter(tmp_path, "first.safetensors")
    second, _ = _adapter(tmp_path, "second.safetensors", seed=2, method="adapter", adapter_kind="parallel")
    bank = AdapterBank(base("vit_tiny"))
    bank.add("first", first)
    model = bank.activate("first")
    with torch.no_grad():  # the frozen encoder weights change while an adapter is active
        model.image_encoder.patch_embed.proj.bias.add_(0.5)
    with pytest.raises(AdapterError, match=re.escape(f"sha256 {recorded}, but this base has sha256")):
        bank.add("second", second)
    assert bank.active == "first" and is_injected(model) and bank.names == ["first"]
    bank.add("second", second, force=True)
    assert bank.names == ["first", "second"] and bank.active == "first"


def test_adapter_bank_add_while_active_keeps_the_active_adapter(tmp_path):
    first, _ = _adapter(tmp_path, "first.safetensors")
    second, _ = _adapter(tmp_path, "second.safetensors", seed=2)
    bank = AdapterBank(base("vit_tiny"))
    bank.add("first", first)
    model = bank.activate("first")
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    box = torch.tensor([[10.0, 20.0, 90.0, 100.0]])
    with torch.no_grad():
        before = model(image, boxes=box)[0]
    bank.add("second", second)  # same base: accepted
    assert bank.active == "first"
    with torch.no_grad():
        assert torch.equal(model(image, boxes=box)[0], before)


def test_state_hash_follows_its_documented_definition():
    """Old adapter files record this hash: an independent implementation of the documented definition."""
    state = {"b.weight": torch.tensor([[1.0, -2.0]], dtype=torch.float32), "a.count": torch.tensor(3),
             "c.empty": torch.zeros(0, 4, dtype=torch.float16), "not_a_tensor": 1.5}
    digest = hashlib.sha256()
    for key in ("a.count", "b.weight", "c.empty"):
        t = state[key]
        digest.update(key.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode())
        digest.update(t.numpy().tobytes(order="C"))
    assert sha256_state_dict(state) == digest.hexdigest()
    assert sha256_state_dict({"b.weight": state["b.weight"].t().contiguous().t()} | {
        k: v for k, v in state.items() if k != "b.weight"}) == digest.hexdigest()  # memory layout does not matter


def test_export_fuse_records_the_weights_there():
    from medico_peft.export.fuse import fuse

    model = base("vit_tiny")
    recorded = model.base_sha256
    with torch.no_grad():
        model.mask_decoder.iou_token.weight.add_(1.0)
    _, info = fuse(model)
    assert info["base_sha256"] == sha256_state_dict(model.state_dict()) != recorded


def test_adapter_saved_after_an_in_place_change_names_the_weights_it_was_trained_on(tmp_path):
    """inject hashes the base it injects into, so save_adapter records that base, not the one loaded."""
    from medico_peft.adapters import load_adapter, save_adapter
    from medico_peft.adapters.io import base_state_sha256
    from medico_peft.errors import AdapterError
    from medico_peft.models import build_model
    from medico_peft.tuners import PeftConfig, inject
    from medico_peft.utils.hashing import sha256_state_dict

    model = build_model("vit_tiny", seed=0)
    model.base_sha256 = sha256_state_dict(model.state_dict())
    loaded_hash = model.base_sha256
    with torch.no_grad():
        model.mask_decoder.iou_token.weight[0, 0] += 1.0  # changed in place before injecting
    changed = base_state_sha256(model)
    inject(model, PeftConfig(method="lora", rank=2))
    path = save_adapter(model, tmp_path / "a.safetensors")
    fresh = build_model("vit_tiny", seed=0)
    fresh.base_sha256 = loaded_hash
    with pytest.raises(AdapterError):
        load_adapter(fresh, path)  # the original base is not the one the adapter was trained on
    with torch.no_grad():
        fresh.mask_decoder.iou_token.weight[0, 0] += 1.0
    assert base_state_sha256(fresh) == changed
    load_adapter(fresh, path)  # the changed base is
