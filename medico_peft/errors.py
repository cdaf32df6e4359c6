"""One exception family, so the CLI can print a clean one-line message for bad input."""


class MedicoPeftError(Exception):
    """Base class: bad input or a refused operation, reported without a traceback by the CLI."""


class CheckpointError(MedicoPeftError):
    """A checkpoint is unreadable, unsafe, truncated or of another architecture."""


class ConfigError(MedicoPeftError):
    """A configuration value is missing, unknown or of the wrong type; the message names the field."""


class AdapterError(MedicoPeftError):
    """An adapter file is malformed, from a newer format, or made for another base model."""


class DataError(MedicoPeftError):
    """An input image, label, shard or manifest is invalid; the message names the file and key."""


class ExportError(MedicoPeftError):
    """An export failed or did not pass its parity gate."""
