"""micro-sam / MedicoSAM LoRA checkpoints become medico_peft adapters with equal outputs.

The fixtures follow micro-sam's documented key layout (`micro_sam.models.peft_sam`): the fused qkv wrapped
as `attn.qkv.qkv_proj` with `w_{a,b}_linear_{q,k,v}`, the MLP as `mlp.mlp_layer` with `w_{a,b}_linear_{1,2}`,
scale 1, q|k|v thirds, trainer checkpoints under `model_state` with `sam.` prefixes. The wrappers below are
written here from that description and run on official segment_anything modules as the reference.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _peft_helpers import base
from medico_peft.adapters import load_adapter, read_adapter
from medico_peft.adapters.microsam import import_microsam_checkpoint
from medico_peft.cli import main
from medico_peft.errors import AdapterError


class QkvLoRA(nn.Module):
    def __init__(self, qkv: nn.Linear, rank: int, parts, g):
        super().__init__()
        self.qkv_proj, self.parts, d = qkv, parts, qkv.in_features
        for p in parts:
            setattr(self, f"w_a_linear_{p}", nn.Linear(d, rank, bias=False))
            setattr(self, f"w_b_linear_{p}", nn.Linear(rank, d, bias=False))
            with torch.no_grad():
                getattr(self, f"w_b_linear_{p}").weight.copy_(torch.randn(d, rank, generator=g) * 0.1)

    def forward(self, x):
        out = self.qkv_proj(x)
        d = out.shape[-1] // 3
        chunks = list(out.split(d, dim=-1))
        for p in self.parts:
            i = "qkv".index(p)
            chunks[i] = chunks[i] + getattr(self, f"w_b_linear_{p}")(getattr(self, f"w_a_linear_{p}")(x))
        return torch.cat(chunks, dim=-1)


class MlpLoRA(nn.Module):
    def __init__(self, mlp: nn.Module, rank: int, g):
        super().__init__()
        self.mlp_layer = mlp
        self.w_a_linear_1 = nn.Linear(mlp.lin1.in_features, rank, bias=False)
        self.w_b_linear_1 = nn.Linear(rank, mlp.lin1.out_features, bias=False)
        self.w_a_linear_2 = nn.Linear(mlp.lin2.in_features, rank, bias=False)
        self.w_b_linear_2 = nn.Linear(rank, mlp.lin2.out_features, bias=False)
        with torch.no_grad():
            for lin in (self.w_b_linear_1, self.w_b_linear_2):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.1)

    def forward(self, x):
        m = self.mlp_layer
        h = m.act(m.lin1(x) + self.w_b_linear_1(self.w_a_linear_1(x)))
        return m.lin2(h) + self.w_b_linear_2(self.w_a_linear_2(h))


def _microsam_model(parts=("q", "v"), mlp=False, blocks=(0, 1, 2, 3), rank=2, touch_decoder=True):
    sam = base("vit_tiny")  # MedSam: official module objects and names (segment_anything's ImageEncoderViT etc.)
    g = torch.Generator().manual_seed(7)
    for i in blocks:
        block = sam.image_encoder.blocks[i]
        block.attn.qkv = QkvLoRA(block.attn.qkv, rank, parts, g)
        if mlp:
            block.mlp = MlpLoRA(block.mlp, rank, g)
    if touch_decoder:
        with torch.no_grad():
            sam.mask_decoder.iou_token.weight.add_(0.3)
            sam.mask_decoder.output_upscaling[0].weight.mul_(1.2)
    return sam.eval()


def _save_trainer_checkpoint(sam, path, prefix="sam."):
    torch.save({"model_state": {prefix + k: v for k, v in sam.state_dict().items()}, "iteration": 10}, path)


@torch.no_grad()
def _outputs(model):
    g = torch.Generator().manual_seed(2)
    image = torch.rand(1, 3, 128, 128, generator=g)
    box = torch.tensor([[20.0, 25.0, 100.0, 110.0]])
    emb = model.image_encoder(model.normalize(image))
    sparse, dense = model.prompt_encoder(points=None, boxes=box, masks=None)
    low, _ = model.mask_decoder(image_embeddings=emb, image_pe=model.prompt_encoder.get_dense_pe(),
                                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)
    return emb, low


@pytest.mark.parametrize("kind", ["qv_all_blocks_decoder", "qkv_mlp_some_blocks_ddp"])
def test_microsam_checkpoint_imports_with_equal_outputs(tmp_path, kind):
    if kind == "qv_all_blocks_decoder":
        reference = _microsam_model()
        _save_trainer_checkpoint(reference, tmp_path / "best.pt")
    else:
        reference = _microsam_model(parts=("q", "k", "v"), mlp=True, blocks=(1, 3), rank=3, touch_decoder=False)
        _save_trainer_checkpoint(reference, tmp_path / "best.pt", prefix="module.sam.")
    model = import_microsam_checkpoint(base("vit_tiny"), tmp_path / "best.pt")
    for theirs, ours in zip(_outputs(reference), _outputs(model)):
        assert (theirs - ours).abs().max().item() <= 1e-5
    cfg = model.medico_peft.config
    if kind == "qv_all_blocks_decoder":
        assert (cfg.targets, cfg.blocks, cfg.train_decoder, cfg.rank, cfg.alpha) == (("q", "v"), "all", True, 2, 2.0)
    else:
        assert (cfg.targets, cfg.blocks, cfg.train_decoder) == (("q", "k", "v", "mlp"), (1, 3), False)
    plain = base("vit_tiny")
    assert (_outputs(plain)[1] - _outputs(model)[1]).abs().max() > 1e-3  # the LoRA really changed the model


def test_cli_import_writes_an_adapter_that_reloads(tmp_path):
    reference = _microsam_model()
    _save_trainer_checkpoint(reference, tmp_path / "best.pt")
    out = tmp_path / "a.safetensors"
    assert main(["adapter", "import", "--micro-sam", str(tmp_path / "best.pt"), "--model", "vit_tiny",
                 "--out", str(out)]) == 0
    meta, _ = read_adapter(out)
    assert meta["extra"]["imported_format"] == "micro-sam"
    model = load_adapter(base("vit_tiny"), out)
    for theirs, ours in zip(_outputs(reference), _outputs(model)):
        assert (theirs - ours).abs().max().item() <= 1e-5


def test_checkpoint_without_lora_keys_is_refused_and_nothing_written(tmp_path):
    _save_trainer_checkpoint(base("vit_tiny"), tmp_path / "plain.pt")
    out = tmp_path / "a.safetensors"
    assert main(["adapter", "import", "--micro-sam", str(tmp_path / "plain.pt"), "--model", "vit_tiny",
                 "--out", str(out)]) != 0
    assert not out.exists()
    with pytest.raises(AdapterError, match="no micro-sam LoRA keys"):
        import_microsam_checkpoint(base("vit_tiny"), tmp_path / "plain.pt")


def test_another_base_or_size_is_refused(tmp_path):
    reference = _microsam_model()
    with torch.no_grad():
        reference.image_encoder.blocks[0].attn.proj.weight.add_(0.01)  # finetuned from another base
    _save_trainer_checkpoint(reference, tmp_path / "other.pt")
    with pytest.raises(AdapterError, match="frozen image encoder differs from this base at image_encoder.blocks.0"):
        import_microsam_checkpoint(base("vit_tiny"), tmp_path / "other.pt")
    from medico_peft.models import load_model

    bigger = load_model("vit_tiny", img_size=192)
    with pytest.raises(AdapterError, match="another architecture or size"):
        import_microsam_checkpoint(bigger, tmp_path / "other.pt")
    with pytest.raises(AdapterError, match="only for the ViT models"):
        import_microsam_checkpoint(base("litemedsam"), tmp_path / "other.pt")
