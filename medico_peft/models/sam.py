"""`MedSam`: SAM's three parts (image encoder, prompt encoder, mask decoder) behind one small API.

Attribute names match official SAM, so `state_dict()` keys are `image_encoder.*`,
`prompt_encoder.*` and `mask_decoder.*` and load into `segment_anything` unchanged.

Conventions used across the library:
- images enter as float tensors (B, 3, S, S) in [0, 1], already resized (longest side → S) and
  padded bottom/right; `normalize` applies the model's own pixel statistics and, given each item's
  `input_size`, sets the padding to 0 after normalising (official SAM's padding);
- point coordinates are (x, y) pixels of that S×S input; boxes are xyxy pixels;
- the decoder runs on any number of prompts per image: `image_index` maps each prompt row to its
  image. Official SAM's `repeat_interleave` only supports one image with many prompts and breaks
  TensorRT; gathering by index (or `expand` for one image) supports both.
"""

from __future__ import annotations

import torch
from torch import nn

_FLOAT32_TINY = torch.finfo(torch.float32).tiny  # smallest normal float32; below it: subnormal
# On by default; benchmarks/bench_step_time.py turns it off to measure what it saves.
FLUSH_SUBNORMAL_GRADS = True


def _flush_subnormal(grad: torch.Tensor) -> torch.Tensor:
    """The gradient with subnormal values (|g| < 1.18e-38) set to 0: what a CPU with flush-to-zero does.

    The Dice/focal losses take sigmoid' of the logits, which underflows into the subnormal range for
    logits below about -87 (common for SAM's background). On x86 every arithmetic op on a subnormal
    takes a microcode assist (~100× slower), so 20 % subnormal logit gradients made the decoder's
    upscaling backward (ConvTranspose2d, GELU) ~4× slower. `torch.set_flush_denormal` only sets the
    calling thread's MXCSR, not the OpenMP workers'; flushing at the source works on every thread.
    Values this small change no parameter update measurably (they are below float32's normal range).
    """
    tiny = _FLOAT32_TINY if grad.dtype == torch.float32 else torch.finfo(grad.dtype).tiny
    return grad.masked_fill(grad.abs() < tiny, 0.0)


def flush_subnormal_grads(x: torch.Tensor) -> torch.Tensor:
    """Identity in the forward pass; in backward, subnormal gradient values become 0 (see `_flush_subnormal`).
    A no-op without autograd and while tracing/exporting (the graph stays plain)."""
    if FLUSH_SUBNORMAL_GRADS and x.requires_grad and not torch.jit.is_tracing() and not torch.jit.is_scripting() \
            and not torch.onnx.is_in_onnx_export():
        x.register_hook(_flush_subnormal)
    return x

from .mask_decoding import two_way_transformer, upscaled_mask_logits
from .postprocess import upscale_logits
from .specs import ModelSpec


class MedSam(nn.Module):
    def __init__(self, spec: ModelSpec, image_encoder: nn.Module, prompt_encoder: nn.Module,
                 mask_decoder: nn.Module):
        super().__init__()
        self.spec = spec
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(spec.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(spec.pixel_std).view(1, 3, 1, 1), persistent=False)
        # Set by the loader: where the base weights came from and their sha256 (adapters record it).
        self.base_sha256: str | None = None
        self.base_source: str | None = None

    @property
    def img_size(self) -> int:
        return self.spec.img_size

    def train(self, mode: bool = True):
        """Like nn.Module.train, but BatchNorm layers of the image encoder always stay in eval mode.

        TinyViT's 27 BatchNorm layers were trained with large batches; batch statistics from a
        finetuning batch change the encoder output by up to 1.05, so they are never recomputed.
        """
        super().train(mode)
        for m in self.image_encoder.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    # --- image side ---------------------------------------------------------------------------
    def normalize(self, images: torch.Tensor, input_size: torch.Tensor | None = None) -> torch.Tensor:
        """`(x - mean) / std`; with `input_size` ((B, 2) or (2,): each item's content height and width), the
        padding outside it is set to 0 after normalising, as official SAM pads (and as the Predictor feeds:
        it pads with the pixel mean). Shards and the loader pad with 0 *before* normalising, which would
        give the ViT a padding of -mean/std instead. Models whose normalisation is the identity (LiteMedSAM:
        mean 0, std 1) already get 0 padding and are returned untouched, bit for bit.
        """
        x = (images - self.pixel_mean) / self.pixel_std
        if input_size is None or self._identity_normalisation():
            return x
        size = torch.as_tensor(input_size, device=images.device).reshape(-1, 2)
        idx = torch.arange(images.shape[-1], device=images.device)
        rows = idx[None, :] < size[:, :1]  # (B, S)
        cols = idx[None, :] < size[:, 1:]
        content = (rows[:, :, None] & cols[:, None, :]).unsqueeze(1)  # (B, 1, S, S)
        return torch.where(content, x, torch.zeros((), dtype=x.dtype, device=x.device))

    def _identity_normalisation(self) -> bool:
        return bool((self.pixel_mean == 0).all() and (self.pixel_std == 1).all())

    def encode(self, images: torch.Tensor, input_size: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, S, S) images in [0, 1] → (B, C, E, E) embeddings; `input_size`: see `normalize`."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != self.img_size \
                or images.shape[-2] != self.img_size:
            raise ValueError(f"images must be (B, 3, {self.img_size}, {self.img_size}), got {tuple(images.shape)}")
        return self.image_encoder(self.normalize(images, input_size))

    # --- prompt side --------------------------------------------------------------------------
    def embed_prompts(self, points: torch.Tensor | None = None, point_labels: torch.Tensor | None = None,
                      boxes: torch.Tensor | None = None, mask_input: torch.Tensor | None = None):
        """Sparse and dense prompt embeddings for K prompt rows.

        points (K, P, 2) with labels (K, P) (1 pos, 0 neg, -1 padding); boxes (K, 4);
        mask_input (K, 1, 4E, 4E) low-res logits from a previous step.
        """
        pts = None
        if points is not None:
            if point_labels is None:
                raise ValueError("point_labels are required with points")
            pts = (points, point_labels)
        box = boxes if boxes is None else boxes.reshape(-1, 4)
        return self.prompt_encoder(points=pts, boxes=box, masks=mask_input)

    def decode_all_tokens(self, embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor,
                          image_index: torch.Tensor | None = None):
        """Mask decoder for K prompt rows, every mask token: logits (K, 4, 4E, 4E), iou (K, 4).

        Token 0 is SAM's single-mask answer, tokens 1..3 the multimask answers. `image_index` (K,)
        selects each row's image embedding; omitted, one image is shared by all rows via `expand`
        (no copy, no `repeat_interleave`, so the same code exports to ONNX and TensorRT).
        """
        md = self.mask_decoder
        k = sparse.shape[0]
        tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        tokens = torch.cat([tokens.unsqueeze(0).expand(k, -1, -1), sparse], dim=1)
        if image_index is None:
            src = embeddings[:1].expand(k, -1, -1, -1)
        else:
            src = embeddings[image_index]
        src = src + dense
        hs, keys = two_way_transformer(md.transformer, src, self.prompt_encoder.get_dense_pe(), tokens)
        iou_out = hs[:, 0, :]
        mask_out = hs[:, 1:1 + md.num_mask_tokens, :]
        hyper = torch.stack([mlp(mask_out[:, i, :]) for i, mlp in enumerate(md.output_hypernetworks_mlps)], dim=1)
        masks = upscaled_mask_logits(md.output_upscaling, keys, hyper, src.shape[-2:])
        return flush_subnormal_grads(masks), md.iou_prediction_head(iou_out)

    def decode(self, embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor,
               image_index: torch.Tensor | None = None, multimask: bool = False):
        """Low-res logits (K, M, 4E, 4E) and iou predictions (K, M): M = 3 with `multimask`, else 1."""
        masks, iou = self.decode_all_tokens(embeddings, sparse, dense, image_index)
        sl = slice(1, None) if multimask else slice(0, 1)
        return masks[:, sl], iou[:, sl]

    def forward(self, images: torch.Tensor, points=None, point_labels=None, boxes=None, mask_input=None,
                image_index=None, multimask: bool = False):
        """Encode images and decode prompts in one call (training and tests)."""
        emb = self.encode(images)
        sparse, dense = self.embed_prompts(points, point_labels, boxes, mask_input)
        if image_index is None and images.shape[0] > 1:
            image_index = torch.arange(images.shape[0], device=images.device)
        return self.decode(emb, sparse, dense, image_index=image_index, multimask=multimask)

    def upscale_logits(self, low_res: torch.Tensor, input_size=None, original_size=None) -> torch.Tensor:
        """Low-res logits → logits at the S×S input, or cropped to `input_size` and resized to `original_size`."""
        return upscale_logits(low_res, self.img_size, input_size, original_size)
