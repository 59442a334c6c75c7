"""Header-only validation of quantized Hugging Face checkpoints (see docs/ARCHITECTURE.md)."""

#: The package version, as in pyproject.toml; reports carry it. A constant, so that a validation
#: run need not import importlib.metadata (~20 ms of a sub-second CLI run).
__version__ = "0.1.0"
