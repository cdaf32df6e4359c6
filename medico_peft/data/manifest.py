"""`manifest.json`: the single entry point to a shard set.

The manifest is written last, atomically; a folder without one is never loadable, so a crashed
conversion cannot be mistaken for a finished one. Checksums tie each listed shard to its bytes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import DataError
from ..utils.atomic import atomic_path
from ..utils.hashing import sha256_file
from .shard_format import FORMAT_NAME, FORMAT_VERSION

MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val", "test")


@dataclass
class ShardEntry:
    file: str  # relative to the manifest folder
    split: str
    n_samples: int
    sha256: str
    bytes: int


@dataclass
class Manifest:
    modality: str
    normalization: str
    image_size: int
    label_names: dict[int, str]
    compression: str
    shards: list[ShardEntry] = field(default_factory=list)
    splits: dict[str, dict] = field(default_factory=dict)  # split -> {"n_samples", "volumes"}
    config: dict = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    path: Path | None = None  # where it was read from; not serialised

    @property
    def root(self) -> Path:
        return self.path.parent if self.path else Path(".")

    def shard_path(self, entry: ShardEntry) -> Path:
        return self.root / entry.file

    def shards_for(self, split: str) -> list[ShardEntry]:
        return [s for s in self.shards if s.split == split]

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("path")
        data["label_names"] = {str(k): v for k, v in sorted(self.label_names.items())}
        return json.dumps(data, indent=2)

    def verify(self, split: str | None = None) -> None:
        """Check every listed shard (of one split) exists and matches its sha256."""
        for entry in self.shards:
            if split is not None and entry.split != split:
                continue
            path = self.shard_path(entry)
            if not path.exists():
                raise DataError(f"{self.path}: shard '{entry.file}' listed in the manifest is missing")
            digest = sha256_file(path)
            if digest != entry.sha256:
                raise DataError(
                    f"{path}: sha256 {digest[:12]}… does not match manifest {entry.sha256[:12]}… "
                    "(shard changed or corrupt; reconvert, or pass verify=False to skip the check)"
                )


def write_manifest(manifest: Manifest, out_dir: str | os.PathLike) -> Path:
    path = Path(out_dir) / MANIFEST_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(manifest.to_json())
    manifest.path = path
    return path


_ENTRY_TYPES = {"file": str, "split": str, "n_samples": int, "sha256": str, "bytes": int}


def _optional_dict(data: dict, key: str, path) -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise DataError(f"{path}: manifest key '{key}' should be an object, got {type(value).__name__}")
    return dict(value)


def _require(data: dict, key: str, kind, path) -> object:
    if key not in data:
        raise DataError(f"{path}: manifest key '{key}' is missing")
    if not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
        raise DataError(f"{path}: manifest key '{key}' should be {kind}, got {type(data[key]).__name__}")
    return data[key]


def load_manifest(path: str | os.PathLike, verify: bool = False) -> Manifest:
    """Read and validate a manifest (file or folder containing `manifest.json`)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    if not path.exists():
        raise DataError(f"{path}: manifest not found (conversion not finished, or wrong folder)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: manifest is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        raise DataError(f"{path}: key 'format' should be {FORMAT_NAME!r}")
    version = _require(data, "format_version", int, path)
    if version > FORMAT_VERSION:
        raise DataError(f"{path}: format_version {version} is newer than supported {FORMAT_VERSION}")
    shards = []
    for i, raw in enumerate(_require(data, "shards", list, path)):
        if not isinstance(raw, dict):
            raise DataError(f"{path}: shards[{i}] should be an object with keys {list(_ENTRY_TYPES)}, "
                            f"got {type(raw).__name__}")
        try:
            entry = ShardEntry(**raw)
        except TypeError as exc:
            raise DataError(f"{path}: shards[{i}] is malformed ({exc})") from None
        for key, kind in _ENTRY_TYPES.items():
            if not isinstance(getattr(entry, key), kind) or isinstance(getattr(entry, key), bool):
                raise DataError(f"{path}: shards[{i}].{key} should be {kind.__name__}, "
                                f"got {type(getattr(entry, key)).__name__}")
        if entry.split not in SPLITS:
            raise DataError(f"{path}: shards[{i}].split is {entry.split!r}, expected one of {SPLITS}")
        shards.append(entry)
    labels = _require(data, "label_names", dict, path)
    try:
        label_names = {int(k): str(v) for k, v in labels.items()}
    except ValueError:
        raise DataError(f"{path}: manifest key 'label_names' should map integer label ids to names, "
                        f"got keys {list(labels)[:3]}") from None
    manifest = Manifest(
        modality=str(_require(data, "modality", str, path)),
        normalization=str(_require(data, "normalization", str, path)),
        image_size=int(_require(data, "image_size", int, path)),
        label_names=label_names,
        compression=str(_require(data, "compression", str, path)),
        shards=shards,
        splits=_optional_dict(data, "splits", path),
        config=_optional_dict(data, "config", path),
        format_version=version,
        path=path,
    )
    for entry in shards:
        if not manifest.shard_path(entry).exists():
            raise DataError(f"{path}: shard '{entry.file}' listed in the manifest is missing")
    if verify:
        manifest.verify()
    return manifest
