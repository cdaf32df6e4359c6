"""HF transformers interop, checked against `transformers.SamModel` and stock `peft.PeftModel` built locally.

What is compared: `SamModel` takes normalised `pixel_values` (its image processor normalises), `MedSam.encode`
takes [0, 1] images and normalises itself, so image embeddings are compared as
`SamModel.get_image_embeddings(model.normalize(x))` vs `model.encode(x)`; decoder outputs as `SamModel(...)`
`pred_masks` / `iou_scores` (multimask, low resolution) vs `MedSam.forward` for the same boxes/points in pixels
of the S x S input. Nothing is downloaded: every model is a small random vit_tiny-sized SAM.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import SamModel  # noqa: E402

from medico_peft.adapters import load_adapter, save_adapter  # noqa: E402
from medico_peft.adapters.hf_transformers import export_peft_hf_dir, import_peft_hf_dir  # noqa: E402
from medico_peft.cli import main  # noqa: E402
from medico_peft.errors import AdapterError, CheckpointError  # noqa: E402
from medico_peft.models import build_model, load_model, save_model  # noqa: E402
from medico_peft.models.hf_sam import (  # noqa: E402
    HF_TIED_KEY, from_hf_state_dict, hf_config_dict, hf_sam_config, load_hf_folder, to_hf_state_dict)
from medico_peft.models.specs import SPECS  # noqa: E402
from medico_peft.tuners import PeftConfig, inject  # noqa: E402

ATOL = 2e-5


@pytest.fixture(scope="module")
def base_path(tmp_path_factory):
    """A vit_tiny checkpoint with every parameter random (pos_embed and rel_pos are zero-initialised otherwise)."""
    model = build_model("vit_tiny", seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos_embed" in name or "rel_pos" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = tmp_path_factory.mktemp("base") / "vit_tiny.pth"
    save_model(model, path)
    return path


def hf_twin(model) -> SamModel:
    """A SamModel built from our config with our (plain) weights mapped in."""
    hf = SamModel(hf_sam_config(model.spec)).eval()
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=False)
    assert missing == [HF_TIED_KEY] and unexpected == []  # the tied copy of shared_image_embedding
    return hf


def probe(model):
    g = torch.Generator().manual_seed(7)
    s = model.img_size
    x = torch.rand(2, 3, s, s, generator=g)
    boxes = torch.tensor([[10.0, 20.0, 90.0, 100.0], [30.0, 25.0, 70.0, 110.0]])
    return x, boxes


def compare(ours, hf) -> dict:
    """Max abs differences of embeddings, box logits/iou and point logits (two images, one prompt each)."""
    x, boxes = probe(ours)
    pts, lab = torch.tensor([[[50.0, 60.0], [20.0, 30.0]]]), torch.tensor([[1, 0]])
    with torch.no_grad():
        emb = ours.encode(x)
        out = {"embeddings": (hf.get_image_embeddings(ours.normalize(x)) - emb).abs().max().item()}
        logits, iou = ours(x, boxes=boxes, multimask=True)
        o = hf(pixel_values=ours.normalize(x), input_boxes=boxes[:, None], multimask_output=True)
        out["box_logits"] = (o.pred_masks[:, 0] - logits).abs().max().item()
        out["box_iou"] = (o.iou_scores[:, 0] - iou).abs().max().item()
        pl, _ = ours(x[:1], points=pts, point_labels=lab, multimask=True)
        o = hf(pixel_values=ours.normalize(x[:1]), input_points=pts[:, None], input_labels=lab[:, None])
        out["point_logits"] = (o.pred_masks[:, 0] - pl).abs().max().item()
        out["scale"] = logits.abs().max().item()
    return out


def assert_close(diffs: dict, atol: float = ATOL) -> None:
    scale = diffs.pop("scale", 1.0)
    assert scale > 1e-2, "outputs are ~0: the comparison would show nothing"
    assert all(v <= atol for v in diffs.values()), diffs


# --- key map, config, folders ----------------------------------------------------------------------
def test_key_map_is_one_to_one_onto_samodel(base_path):
    model = load_model(checkpoint=base_path)
    state = model.state_dict()
    hf_state = to_hf_state_dict(state)
    hf_keys = set(SamModel(hf_sam_config(model.spec)).state_dict())
    assert set(hf_state) == hf_keys - {HF_TIED_KEY}
    back = from_hf_state_dict(hf_state, state.keys())
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    for name in ("vit_b", "vit_l", "vit_h"):  # the real sizes map completely too (keys only, no weights)
        spec = SPECS[name]
        with torch.device("meta"):
            keys = build_model(name).state_dict().keys()
            hf_keys = set(SamModel(hf_sam_config(spec)).state_dict())
        assert set(to_hf_state_dict(dict.fromkeys(keys, torch.empty(0)))) == hf_keys - {HF_TIED_KEY}, name


def test_samodel_with_mapped_weights_matches_medsam(base_path):
    model = load_model(checkpoint=base_path)
    assert_close(compare(model, hf_twin(model)))


def test_litemedsam_has_no_samodel_and_says_why():
    with pytest.raises(CheckpointError, match="no TinyViT SAM"):
        hf_config_dict(SPECS["litemedsam"])


def test_convert_hf_round_trip_is_exact_and_loads_in_transformers(base_path, tmp_path):
    folder, back = tmp_path / "hf", tmp_path / "back.pth"
    assert main(["convert-hf", "to-hf", "--checkpoint", str(base_path), "--out", str(folder)]) == 0
    assert main(["convert-hf", "from-hf", str(folder), "--out", str(back)]) == 0
    a = torch.load(base_path, weights_only=True)
    b = torch.load(back, weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf, info = SamModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = load_model(checkpoint=base_path)
    assert_close(compare(ours, hf.eval()))
    # our loaders read the folder directly as a checkpoint too
    assert load_model(checkpoint=folder).base_sha256 == ours.base_sha256


def test_convert_hf_merges_an_adapter_first(base_path, tmp_path):
    model = load_model(checkpoint=base_path)
    inject(model, PeftConfig(method="lora", rank=2, targets=["q", "v"]))
    _perturb(model)
    save_adapter(model, tmp_path / "a.safetensors")
    folder = tmp_path / "hf"
    assert main(["convert-hf", "to-hf", "--adapter", str(tmp_path / "a.safetensors"), "--checkpoint",
                 str(base_path), "--out", str(folder)]) == 0
    hf = SamModel.from_pretrained(folder).eval()
    assert_close(compare(model.eval(), hf), atol=1e-4)


def test_folder_of_another_model_type_is_refused(tmp_path, capsys):
    folder = tmp_path / "vit"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 768}))
    with pytest.raises(CheckpointError, match="model_type is 'vit', expected 'sam'"):
        load_hf_folder(folder)
    out = tmp_path / "x.pth"
    assert main(["convert-hf", "from-hf", str(folder), "--out", str(out)]) == 2
    assert "model_type is 'vit'" in capsys.readouterr().err and not out.exists()


def test_to_hf_of_litemedsam_writes_nothing(tmp_path, capsys, litemedsam_path):
    out = tmp_path / "hf"
    assert main(["convert-hf", "to-hf", "--checkpoint", litemedsam_path, "--out", str(out)]) == 2
    assert "no TinyViT SAM" in capsys.readouterr().err and not out.exists()


# --- peft-hf export --------------------------------------------------------------------------------
def _perturb(model, seed: int = 1, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


EXPORT_CASES = {
    "qv_rank2r_decoder": dict(method="lora", rank=2, targets=["q", "v"]),
    "q_k_v_proj_mlp_blocks": dict(method="lora", rank=3, alpha=5.0, targets=["q", "k", "v", "proj", "mlp"],
                                  blocks=[1, 3], train_prompt_encoder=True),
    "qv_rslora": dict(method="lora", rank=2, alpha=3.0, use_rslora=True, targets=["q", "v"]),
    "dora_qv_fused": dict(method="dora", rank=2, targets=["q", "v"]),
    "decoder_lora": dict(method="decoder_only", rank=2, decoder_lora=True, train_decoder=False),
    "qkv_plus_decoder_lora": dict(method="lora", rank=2, targets=["qkv"], decoder_lora=True),
}


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_peft_hf_export_loads_in_stock_peft_on_samodel(case, base_path, tmp_path):
    model = load_model(checkpoint=base_path)
    inject(model, PeftConfig(**EXPORT_CASES[case]))
    _perturb(model)
    model.eval()
    out = export_peft_hf_dir(model, tmp_path / "hf_peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = PeftModel.from_pretrained(hf_twin(load_model(checkpoint=base_path)), str(out)).eval()
    diffs = compare(model, stock)
    plain = compare(load_model(checkpoint=base_path), stock)
    assert max(plain["box_logits"], plain["embeddings"]) > 1e-2  # the adapter changes the outputs
    assert_close(diffs)


def test_peft_hf_export_cli_and_refusals(base_path, tmp_path, capsys):
    model = load_model(checkpoint=base_path)
    inject(model, PeftConfig(method="lora", rank=2, targets=["q", "v"]))
    _perturb(model)
    save_adapter(model, tmp_path / "a.safetensors")
    out = tmp_path / "out"
    args = ["adapter", "export", "--adapter", str(tmp_path / "a.safetensors"), "--checkpoint", str(base_path),
            "--format", "peft-hf", "--out", str(out)]
    assert main(args) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and set(cfg["rank_pattern"].values()) == {4}
    assert main(args) == 2 and "not empty" in capsys.readouterr().err  # no silent overwrite
    bottleneck = load_model(checkpoint=base_path)
    inject(bottleneck, PeftConfig(method="adapter"))
    with pytest.raises(AdapterError, match="no bottleneck adapters"):
        export_peft_hf_dir(bottleneck, tmp_path / "b")
    lite = build_model("litemedsam")
    inject(lite, PeftConfig(method="lora", rank=2))
    with pytest.raises(AdapterError, match="no TinyViT SAM"):
        export_peft_hf_dir(lite, tmp_path / "c")
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


# --- import of stock-peft SamModel adapters --------------------------------------------------------
ENC = r"vision_encoder\.layers\.\d+\.(?:attn\.qkv|attn\.proj|mlp\.lin1|mlp\.lin2)"
DEC = r"mask_decoder\.transformer\.layers\.\d+\.(?:self_attn|cross_attn_token_to_image)\.(?:q_proj|v_proj)"

IMPORT_CASES = {
    "qkv_proj_mlp_decoder_saved": dict(r=2, lora_alpha=4, target_modules=rf"^{ENC}$", modules_to_save=["mask_decoder"]),
    "patterns_partial_decoder_lora": dict(
        r=2, lora_alpha=2, target_modules=rf"^(?:vision_encoder\.layers\.[13]\.attn\.qkv|vision_encoder\.layers\.2\.mlp\.lin1|{DEC})$",
        rank_pattern={"vision_encoder.layers.3.attn.qkv": 4}, alpha_pattern={"layers.1.attn.qkv": 7}),
    "dora_rslora_prompt_encoder": dict(r=3, lora_alpha=5, use_dora=True, use_rslora=True,
                                       target_modules=r"^vision_encoder\.layers\.\d+\.attn\.(?:qkv|proj)$",
                                       modules_to_save=["prompt_encoder"]),
}


def stock_adapter(base_path, folder, case: str, train_fourier: bool = False, **extra):
    """Train-like: stock peft on a SamModel twin of our base, random LoRA/decoder values, save_pretrained."""
    hf = hf_twin(load_model(checkpoint=base_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(hf, LoraConfig(**{**IMPORT_CASES[case], **extra}))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters()):
            if p.requires_grad and (train_fourier or "positional_embedding" not in name):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(str(folder))
    return pm.eval()


@pytest.mark.parametrize("case", sorted(IMPORT_CASES))
def test_stock_peft_samodel_adapter_imports_onto_medsam(case, base_path, tmp_path):
    stock = stock_adapter(base_path, tmp_path / "stock", case)
    model, probe_diff = import_peft_hf_dir(load_model(checkpoint=base_path), tmp_path / "stock")
    assert probe_diff <= 1e-4
    model.eval()
    assert_close(compare(model, stock))
    save_adapter(model, tmp_path / "ours.safetensors")  # and it is one of our adapter files
    reloaded = load_adapter(load_model(checkpoint=base_path), tmp_path / "ours.safetensors").eval()
    assert_close(compare(reloaded, stock))


def test_adapter_import_cli_detects_samodel_naming(base_path, tmp_path, capsys):
    stock = stock_adapter(base_path, tmp_path / "stock", "qkv_proj_mlp_decoder_saved")
    out = tmp_path / "ours.safetensors"
    assert main(["adapter", "import", "--peft", str(tmp_path / "stock"), "--checkpoint", str(base_path),
                 "--out", str(out)]) == 0
    assert "transformers.SamModel naming" in capsys.readouterr().out
    model = load_adapter(load_model(checkpoint=base_path), out).eval()
    assert model.medico_peft.config.targets == ("qkv", "proj", "mlp")
    assert_close(compare(model, stock))


def test_our_hf_export_imports_back(base_path, tmp_path):
    model = load_model(checkpoint=base_path)
    inject(model, PeftConfig(method="dora", rank=2, targets=["q", "v", "mlp"]))
    _perturb(model)
    export_peft_hf_dir(model.eval(), tmp_path / "hf")
    back, _ = import_peft_hf_dir(load_model(checkpoint=base_path), tmp_path / "hf")
    x, boxes = probe(model)
    with torch.no_grad():
        assert (back.eval()(x, boxes=boxes)[0] - model(x, boxes=boxes)[0]).abs().max() <= ATOL


def _write_dir(folder, config: dict, tensors: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                            "bias": "none", **config}))
    save_file(tensors, str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("bad,match", [
    ({"base_model.model.vision_encoder.layers.0.attn.qkv.lora_A.weight": torch.zeros(2, 768),
      "base_model.model.vision_encoder.layers.0.attn.qkv.lora_B.weight": torch.zeros(2304, 2)},
     "another size"),
    ({"base_model.model.vision_encoder.layers.11.attn.qkv.lora_A.weight": torch.zeros(2, 64),
      "base_model.model.vision_encoder.layers.11.attn.qkv.lora_B.weight": torch.zeros(192, 2)},
     "does not exist in vit_tiny"),
    ({"base_model.model.vision_encoder.neck.conv1.lora_A.weight": torch.zeros(2, 64, 1, 1),
      "base_model.model.vision_encoder.neck.conv1.lora_B.weight": torch.zeros(32, 2, 1, 1)},
     "cannot be placed"),
    ({"base_model.model.image_encoder.blocks.0.attn.qkv.lora_A.weight": torch.zeros(2, 64),
      "base_model.model.image_encoder.blocks.0.attn.qkv.lora_B.weight": torch.zeros(192, 2)},
     "official segment_anything"),
])
def test_bad_peft_dirs_are_refused_and_leave_the_base_alone(bad, match, base_path, tmp_path, capsys):
    _write_dir(tmp_path / "bad", {}, bad)
    model = load_model(checkpoint=base_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match=match):
        import_peft_hf_dir(model, tmp_path / "bad")
    assert not hasattr(model, "medico_peft") and model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    out = tmp_path / "x.safetensors"
    assert main(["adapter", "import", "--peft", str(tmp_path / "bad"), "--format", "peft-hf", "--checkpoint", str(base_path),
                 "--out", str(out)]) == 2
    assert match in capsys.readouterr().err and not out.exists()


def test_non_lora_peft_type_is_refused(base_path, tmp_path):
    _write_dir(tmp_path / "ia3", {"peft_type": "IA3"},
               {"base_model.model.vision_encoder.layers.0.attn.qkv.ia3_l": torch.ones(192, 1)})
    with pytest.raises(AdapterError, match="peft_type is 'IA3'"):
        import_peft_hf_dir(load_model(checkpoint=base_path), tmp_path / "ia3")


def test_a_trained_fourier_matrix_is_refused(base_path, tmp_path):
    """SamModel's prompt-encoder positional matrix is a Parameter; segment_anything's is a fixed buffer."""
    stock_adapter(base_path, tmp_path / "stock", "dora_rslora_prompt_encoder", train_fourier=True)
    with pytest.raises(AdapterError, match="random Fourier matrix fixed"):
        import_peft_hf_dir(load_model(checkpoint=base_path), tmp_path / "stock")


@pytest.mark.slow
def test_vit_b_sized_model_and_qv_adapter_match_samodel(tmp_path):
    """vit_b's real dimensions (768 wide, 12 blocks, global attention at 2/5/8/11) at 256² to stay fast on CPU."""
    model = build_model("vit_b", img_size=256, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos_embed" in name or "rel_pos" in name:
                p.normal_(0, 0.2)
    save_model(model, tmp_path / "b.safetensors")
    base = load_model(checkpoint=tmp_path / "b.safetensors")
    assert_close(compare(base, hf_twin(base)), atol=1e-4)
    inject(base, PeftConfig(method="lora", rank=4, targets=["q", "v"]))
    _perturb(base, scale=0.05)
    export_peft_hf_dir(base.eval(), tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = PeftModel.from_pretrained(hf_twin(load_model(checkpoint=tmp_path / "b.safetensors")),
                                          str(tmp_path / "hf")).eval()
    assert_close(compare(base, stock), atol=1e-4)
