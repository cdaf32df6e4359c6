"""Adapter files: save/load/inspect (`.safetensors` + metadata), HF peft directories, switching."""

from .format import FORMAT_VERSION
from .hf_format import export_peft_dir, import_peft_dir
from .io import inspect_adapter, load_adapter, read_adapter, save_adapter
from .semantic import check_class_table, load_semantic_adapter, save_semantic_adapter
from .switching import AdapterBank

__all__ = ["save_adapter", "load_adapter", "inspect_adapter", "read_adapter", "AdapterBank", "export_peft_dir",
           "import_peft_dir", "FORMAT_VERSION",
           "save_semantic_adapter", "load_semantic_adapter", "check_class_table"]
