"""Merged checkpoints at an input size other than the official one: a `.pth` (the official layout) is
refused with a message naming the size; a `.safetensors` is written and medico_peft loads it at its size."""

from __future__ import annotations

import pytest
import torch

from _peft_helpers import logits, perturb_trainable
from medico_peft.adapters import save_adapter
from medico_peft.cli import main
from medico_peft.errors import CheckpointError
from medico_peft.models import load_model, save_model
from medico_peft.tuners import PeftConfig, inject, merge


def _merged(name: str, img_size: int):
    model = inject(load_model(name, img_size=img_size), PeftConfig(rank=4, targets=["q", "v"]))
    perturb_trainable(model, scale=0.01)
    return model, merge(model, strict=True)


def test_pth_at_other_size_is_refused_and_safetensors_loads_at_its_size(tmp_path):
    model, merged = _merged("vit_tiny", 64)  # vit_tiny's own size is 128
    pth = tmp_path / "merged.pth"
    with pytest.raises(CheckpointError) as info:
        save_model(merged, pth)
    msg = str(info.value)
    assert str(pth) in msg and "img_size 64" in msg and "img_size 128" in msg and "image_encoder.pos_embed" in msg
    assert ".safetensors" in msg and "\n" not in msg and not pth.exists()
    st = save_model(merged, tmp_path / "merged.safetensors")
    again = load_model(checkpoint=st)
    assert again.img_size == 64 and again.image_encoder.pos_embed.shape[1] == 4
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), merged.state_dict().values()))
    torch.testing.assert_close(logits(again), logits(model), atol=1e-4, rtol=0)
    assert load_model("vit_tiny", checkpoint=st).img_size == 64  # naming the model keeps the file's size


def test_native_size_pth_is_still_written(tmp_path):
    _, merged = _merged("vit_tiny", 128)
    path = save_model(merged, tmp_path / "merged.pth")
    assert load_model(checkpoint=path).img_size == 128


def test_cli_merge_at_other_size(tmp_path, capsys):
    model = inject(load_model("vit_tiny", img_size=64), PeftConfig(rank=4, targets=["q", "v"]))
    perturb_trainable(model)
    adapter = save_adapter(model, tmp_path / "task.safetensors")
    pth = tmp_path / "m.pth"
    assert main(["adapter", "merge", "--adapter", str(adapter), "--out", str(pth)]) == 2
    err = capsys.readouterr().err
    assert "img_size 64" in err and "Traceback" not in err and not pth.exists()
    st = tmp_path / "m.safetensors"
    assert main(["adapter", "merge", "--adapter", str(adapter), "--out", str(st)]) == 0
    merged = load_model(checkpoint=st)
    assert merged.img_size == 64
    torch.testing.assert_close(logits(merged), logits(model), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_official_segment_anything_refuses_512_tables_and_we_do_not_write_them(tmp_path):
    """vit_b at 512²: official `sam_model_registry['vit_b']` (built at 1024) cannot load the resized
    pos_embed/rel_pos, so `.pth` is refused; the `.safetensors` loads in medico_peft at 512."""
    from segment_anything import sam_model_registry

    _, merged = _merged("vit_b", 512)
    raw = tmp_path / "raw512.pth"
    torch.save(merged.state_dict(), raw)  # what save_model wrote before this check
    with pytest.raises(RuntimeError, match="size mismatch for image_encoder.pos_embed"):
        sam_model_registry["vit_b"](checkpoint=str(raw))
    with pytest.raises(CheckpointError, match="vit_b is built at img_size 1024, but this model is at img_size 512"):
        save_model(merged, tmp_path / "merged.pth")
    st = save_model(merged, tmp_path / "merged.safetensors")
    ours = load_model("vit_b", checkpoint=st)
    assert ours.img_size == 512
    mine, theirs = merged.state_dict(), ours.state_dict()
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
