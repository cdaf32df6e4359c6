"""What the onnxruntime and TensorRT backends share: reading an export's typed description, preparing the
encoder's input the way the export expects it, and choosing the decoder's mask outputs."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError, ExportError
from .artifacts import ExportedModel, require_task
from .preprocess import intensity_mode, preprocess_image


class ExportedBackend:
    """Base of the backends that run an exported folder; `what` names the artefact in messages."""

    what = "export"
    task = "interactive"  # the sidecar task this backend runs; a folder of the other task is refused

    def _adopt(self, artifact: ExportedModel) -> None:
        require_task(artifact, self.task)
        self.artifact = artifact
        self.meta = artifact.meta
        self.img_size = artifact.img_size
        self.family = artifact.family
        self.embedding_size = artifact.embedding_size
        self.with_preprocess = artifact.with_preprocess
        self.input_dtype = artifact.input_dtype
        self.mask_outputs = artifact.mask_outputs
        self.pixel_mean = artifact.pixel_mean

    def encoder_feed(self, image_hwc3: np.ndarray) -> np.ndarray:
        """The encoder's `image` input: the raw H×W×3 array for in-graph preprocessing (float32 input accepts
        any dtype, converted), else the model's own resize/normalise/pad to (1, 3, S, S)."""
        if not self.with_preprocess:
            mode = intensity_mode(self.family, image_hwc3.dtype)
            return preprocess_image(torch.from_numpy(image_hwc3), self.img_size, mode,
                                    pad_value=self.pixel_mean).numpy()
        if np.dtype(self.input_dtype) != image_hwc3.dtype:
            if self.input_dtype != "float32":
                raise DataError(f"image: this {self.what} was exported for {self.input_dtype} input (in-graph "
                                f"preprocessing), got {image_hwc3.dtype}; re-export or pass {self.input_dtype}")
            image_hwc3 = image_hwc3.astype(np.float32)
        return image_hwc3

    def mask_slice(self, multimask: bool) -> slice:
        """Which of the decoder's mask outputs answer `multimask` (refused if the export dropped them)."""
        sl = self.artifact.mask_slice(multimask)
        if sl is None:
            raise ExportError(f"{self.what} was exported with mask_outputs={self.mask_outputs!r}; it cannot answer "
                              f"multimask={multimask} (re-export with --mask-outputs all)")
        return sl

    def check_feed(self, part: str, name: str, feed: np.ndarray) -> None:
        """Refuse an input whose rank, fixed dimensions or dtype differ from the exported graph's (from the
        sidecar), naming the graph, the input, the expected and the given shape."""
        entry = next((e for e in self.meta["io"][part]["inputs"] if e["name"] == name), None)
        if entry is None:
            raise ExportError(f"{self.artifact.sidecar}: the {part} graph has no input {name!r}")
        want = list(entry["shape"])
        got = list(np.shape(feed))
        shown = "×".join(str(d) for d in want)
        if len(got) != len(want) or any(isinstance(w, int) and w > 0 and w != g for w, g in zip(want, got)):
            hint = (" (an H×W×3 image: this graph preprocesses in-graph)" if self.with_preprocess else
                    f" (the padded {self.img_size}×{self.img_size} model input: pass the original image to the "
                    "Predictor, which resizes and pads it)")
            raise DataError(f"{name}: shape {tuple(got)} does not fit the exported {part} graph, which takes "
                            f"{shown}{hint}")
        if np.dtype(feed.dtype).name != entry["dtype"]:
            raise DataError(f"{name}: dtype {np.dtype(feed.dtype).name} does not fit the exported {part} graph, "
                            f"which takes {entry['dtype']}")
