"""peft's newer LoRA options on SAM: PiSSA / OLoRA / EVA initialisation and LoRA+ (rsLoRA exists).

- default / eva: B = 0, the injected model equals the base exactly; eva's A rows are the top principal
  directions of the layer inputs (checked against an SVD of the captured inputs of the plain base model);
- pissa / olora: the base holds the residual W - s·B0·A0, residual + adapter equals the original weight and
  the outputs equal the base's (≤ 1e-4); `unload` gives back the original weights bit for bit;
- saved pissa/olora adapters are plain rank-2r LoRAs on the ORIGINAL base (tied by its sha256): loaded onto a
  fresh original base they reproduce the trained model (≤ 1e-4); they merge, export (stock peft) and import;
- LoRA+: B matrices train at lr × ratio (the groups peft's `create_loraplus_optimizer` would give B).
"""

from __future__ import annotations

import copy

import pytest
import torch

from _training_helpers import tiny_cfg
from medico_peft.adapters import load_adapter, read_adapter
from medico_peft.errors import ConfigError
from medico_peft.models import build_model
from medico_peft.tuners import PeftConfig, inject, merge, peft_state, unload, verify_merge
from medico_peft.tuners.merge import _probe_outputs, default_probe
from medico_peft.utils.hashing import sha256_state_dict

TARGETS = ("q", "v", "proj")  # split q/v (qkv_split) and a whole Linear


def _base():
    return build_model("vit_tiny", seed=0).eval()


def _max_diff(a_model, b_model) -> float:
    probe = default_probe(a_model.img_size)
    a_model.eval(), b_model.eval()
    return max((a - b).abs().max().item() for a, b in zip(_probe_outputs(a_model, probe),
                                                           _probe_outputs(b_model, probe)))


def _lora_layers(model):
    from medico_peft.tuners.lora.layer import lora_layer_names

    return {n: model.get_submodule(n) for n in lora_layer_names(model)}


@pytest.fixture(scope="module")
def base_model():
    return _base()


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("init", ["default", "eva"])
def test_zero_b_inits_equal_base_exactly(base_model, init, method):
    model = inject(_base(), PeftConfig(method=method, rank=4, init=init, targets=TARGETS))
    for layer in _lora_layers(model).values():
        assert (layer.lora_B["default"].weight == 0).all()
    assert _max_diff(base_model, model) == 0.0


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_olora_residual_plus_adapter_is_the_base(base_model, init, method):
    model = inject(_base(), PeftConfig(method=method, rank=4, init=init, targets=TARGETS))
    original = dict(base_model.named_parameters())
    layers = _lora_layers(model)
    assert {n.rsplit(".", 1)[-1] for n in layers} == {"q", "v", "proj"}
    for name, layer in layers.items():
        w = layer.get_base_layer().weight
        a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        orig = original[name.replace(".qkv.q", ".qkv").replace(".qkv.v", ".qkv") + ".weight"]
        if name.endswith((".q", ".v")):  # the split rows of the fused qkv
            dim = w.shape[0]
            orig = orig[:dim] if name.endswith(".q") else orig[2 * dim:]
        assert (w - orig).abs().max() > 1e-3  # the base now holds the residual ...
        assert torch.allclose(w + s * b @ a, orig, atol=1e-5)  # ... and residual + adapter is the original
    original_sha = sha256_state_dict(base_model.state_dict())
    assert model.base_sha256 == original_sha  # hashed before the init changed the weights
    assert _max_diff(base_model, model) <= 1e-4
    unload(model)
    assert sha256_state_dict(model.state_dict()) == original_sha  # original weights back, bit for bit


def test_eva_rows_are_principal_directions_of_layer_inputs(base_model):
    """Reference: the inputs of blocks.1 q/v (norm1's output) captured on the PLAIN base, centred, SVD."""
    torch.manual_seed(5)
    images = [torch.rand(2, 3, 128, 128) for _ in range(2)]
    captured = []
    handle = base_model.image_encoder.blocks[1].norm1.register_forward_hook(
        lambda m, args, out: captured.append(out.detach().reshape(-1, out.shape[-1])))
    with torch.no_grad():
        for x in images:
            base_model.encode(x)
    handle.remove()
    x = torch.cat(captured).double()
    _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)

    from medico_peft.tuners.lora.init import eva_initialise, needs_eva

    model = inject(_base(), PeftConfig(rank=4, init="eva", targets=("q", "v")))
    assert needs_eva(model)
    record = eva_initialise(model, ((x_, None) for x_ in images))
    assert not needs_eva(model) and record.batches == 2 and record.tokens == x.shape[0]
    for part in ("q", "v"):
        a = model.get_submodule(f"image_encoder.blocks.1.attn.qkv.{part}").lora_A["default"].weight.double()
        cos = (a * vh[:4]).sum(1).abs()  # unit rows; the sign of a principal direction is arbitrary
        assert torch.allclose(cos, torch.ones(4, dtype=torch.float64), atol=1e-6), cos
        assert torch.allclose(a.norm(dim=1), torch.ones(4, dtype=torch.float64), atol=1e-6)
    assert _max_diff(base_model, model) == 0.0  # B = 0: still the base


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="init: unknown LoRA init 'loftq'"):
        PeftConfig(init="loftq")
    with pytest.raises(ConfigError, match="init: LoRA initialisation 'pissa' needs LoRA layers"):
        PeftConfig(method="adapter", init="pissa")
    with pytest.raises(ConfigError, match="init: eva initialises LoRA from the image encoder"):
        PeftConfig(init="eva", decoder_lora=True)
    with pytest.raises(ConfigError, match="eva_batches"):
        PeftConfig(init="eva", eva_batches=0)
    with pytest.raises(ConfigError, match=r"rank: init 'olora' takes 65 singular directions"):
        inject(_base(), PeftConfig(rank=65, init="olora"))
    with pytest.raises(ConfigError, match="train.loraplus_lr_ratio: LoRA\\+ gives"):
        tiny_cfg("unused", "peft.method=adapter", "train.loraplus_lr_ratio=16")
    with pytest.raises(ConfigError, match="train.loraplus_lr_ratio"):
        tiny_cfg("unused", "train.loraplus_lr_ratio=-1")
    assert PeftConfig.from_dict(PeftConfig(init="olora").to_dict()).init == "olora"  # round trip


def test_cli_options_reach_the_config():
    from medico_peft.commands._options import CommandParser, add_peft_arguments, peft_config_from_args

    p = CommandParser(prog="x")
    add_peft_arguments(p)
    cfg = peft_config_from_args(p.parse_args(["--method", "lora", "--init", "eva", "--eva-batches", "2"]))
    assert (cfg.init, cfg.eva_batches) == ("eva", 2)
    assert "pissa" in p.format_help() and "olora" in p.format_help()
    with pytest.raises(ConfigError, match="init"):
        peft_config_from_args(p.parse_args(["--method", "lora", "--init", "gaussian"]))


def test_loraplus_param_groups_match_peft_b_groups():
    from peft.optimizers import create_loraplus_optimizer

    from medico_peft.training.trainer import build_optimizer

    cfg = tiny_cfg("unused", "train.loraplus_lr_ratio=16", "optim.lr=0.001")
    model = inject(_base(), cfg.peft_config())
    params, opt = build_optimizer(cfg, model)
    assert [g["lr"] for g in opt.param_groups] == [0.001, 0.016]
    ours_b = {id(p) for p in opt.param_groups[1]["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    ref = create_loraplus_optimizer(model, torch.optim.AdamW, lr=0.001, loraplus_lr_ratio=16)
    ref_b = {id(p) for g in ref.param_groups if g["lr"] == 0.016 for p in g["params"]}
    # peft puts every lora_B matrix at lr × ratio (and, unlike us, also every 1-D parameter: decoder biases)
    assert ours_b == {i for i in ref_b if "lora_B" in names[i]}
    assert ours_b and all("lora_B" in names[i] for i in ours_b)
    assert len(params) == sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in
                                                                                model.parameters())
    assert cfg.train.loraplus_lr_ratio == 16.0


def _train(tmp_path, name, *overrides, lrs=None):
    """A short tiny run (2 optimiser steps); returns (trainer, adapter path, config). `lrs` collects the
    learning rate of every optimiser param group after each step."""
    from medico_peft.training import Trainer

    cfg = tiny_cfg(tmp_path / name, "train.epochs=1", "data.synthetic=4", "train.sub_iterations=1",
                   "train.val_clicks=1", "optim.lr=0.01", *overrides)
    with Trainer.from_config(cfg) as trainer:
        if lrs is not None:
            groups = trainer.parts.optimizer.param_groups
            trainer.callbacks.append(lambda event, state: lrs.append([g["lr"] for g in groups])
                                     if event == "step" else None)
        result = trainer.fit()
        return trainer, result.adapter_path, cfg


OPTIONS = {
    "pissa": ("peft.init=pissa",),
    "olora": ("peft.init=olora", "peft.use_rslora=true"),
    "eva": ("peft.init=eva", "peft.eva_batches=2"),
    "loraplus": ("train.loraplus_lr_ratio=16",),
    "pissa_dora": ("peft.init=pissa", "peft.method=dora"),
}


@pytest.mark.parametrize("option", list(OPTIONS))
def test_trained_adapter_saves_loads_merges_and_exports_like_plain_lora(tmp_path, option):
    from medico_peft.adapters.hf_format import export_peft_dir, import_peft_dir
    from medico_peft.training.trainer import build_model_for

    lrs = []
    trainer, path, cfg = _train(tmp_path, option, *OPTIONS[option], lrs=lrs)
    trained = trainer.model.eval()
    pc = cfg.peft_config()
    if option == "loraplus":
        assert lrs and all(len(g) == 2 and g[1] == pytest.approx(16 * g[0]) for g in lrs), lrs
        assert lrs[0][0] > 0  # the ratio holds through the warm-up/cosine schedule
    else:
        assert lrs and all(len(g) == 1 for g in lrs)
    meta, _ = read_adapter(path)
    fresh = build_model_for(cfg).eval()  # the ORIGINAL base (same seed), never touched by the init
    assert meta["base_sha256"] == fresh.base_sha256
    if pc.init in ("pissa", "olora"):
        assert (meta["config"].rank, meta["config"].init) == (2 * pc.rank, "default")
        assert meta["extra"]["lora_init"]["init"] == pc.init
    else:
        assert meta["config"] == pc
    x = default_probe(fresh.img_size).images
    with torch.no_grad():  # the encoder changes through its LoRA layers only: training moved it (not a no-op)
        assert (trained.encode(x) - fresh.encode(x)).abs().max() > 1e-3
    loaded = load_adapter(fresh, path)  # base sha256 checked: the file is tied to the unmodified base
    assert _max_diff(trained, loaded) <= 1e-4
    merged = merge(loaded)
    assert verify_merge(loaded, merged, tolerance=1e-4) <= 1e-4
    assert _max_diff(merge(trained), merged) <= 1e-4  # merging the in-memory (residual) model: same weights
    # stock peft export (checked inside against stock PeftModel.from_pretrained), straight from the trained
    # in-memory model: a pissa/olora model is converted to the plain LoRA on the original base first
    out = export_peft_dir(trained, tmp_path / f"{option}_peft")
    back = import_peft_dir(build_model_for(cfg).eval(), out)
    assert _max_diff(trained, back) <= 1e-4
    if pc.init in ("pissa", "olora"):
        assert peft_state(trained).config.init == pc.init  # export worked on a copy; the model is unchanged


def test_to_plain_lora_in_place(base_model):
    from medico_peft.tuners.lora.init import needs_conversion, to_plain_lora

    model = inject(_base(), PeftConfig(rank=4, init="pissa", targets=TARGETS))
    with torch.no_grad():
        for layer in _lora_layers(model).values():
            layer.lora_B["default"].weight.add_(0.05 * torch.randn_like(layer.lora_B["default"].weight))
    before = copy.deepcopy(model)
    assert _max_diff(base_model, before) > 1e-3
    to_plain_lora(model)
    assert not needs_conversion(model) and peft_state(model).config.rank == 8
    assert _max_diff(before, model) <= 1e-4
    original_sha = sha256_state_dict(base_model.state_dict())
    assert model.base_sha256 == original_sha
    unload(model)
    assert sha256_state_dict(model.state_dict()) == original_sha


@pytest.mark.parametrize("init", ["pissa", "eva"])
def test_resume_gives_the_uninterrupted_adapter(tmp_path, init):
    """A resumed run re-injects (pissa: the same residual from the same SVD; eva: A recomputed, then replaced
    by the checkpoint's) and ends with the adapter an uninterrupted run writes."""
    from _training_helpers import assert_same_tensors
    from medico_peft.training import train

    common = ("train.epochs=1", "data.synthetic=4", "train.sub_iterations=1", "train.val_clicks=1",
              f"peft.init={init}", "peft.eva_batches=1")
    full = train(tiny_cfg(tmp_path / "full", *common))
    cut_cfg = tiny_cfg(tmp_path / "cut", *common, "train.max_steps=1")
    train(cut_cfg)
    resumed = train(tiny_cfg(tmp_path / "cut", *common), resume=True)
    assert resumed.resumed_from_step == 1
    assert_same_tensors(read_adapter(resumed.adapter_path)[1], read_adapter(full.adapter_path)[1], init, atol=1e-6)
