"""Export to, and load from, the engine file (``python -m transip_md.export``).

See ``export/CONTRACT.md`` at the repository root for the engine contract. Export writes only
new files or previous exports (see :mod:`transip_md.export.checkpoint_export`).
"""

from .checkpoint_export import (DEFAULT_MODEL_NAME, check_export_target, default_checkpoint_path,
                                default_model_path, export_checkpoint, resolve_checkpoint)
from .model_file import (FORMAT_VERSION, ModelFileError, export_potential, load_exported,
                         read_metadata)

__all__ = [
    "DEFAULT_MODEL_NAME", "FORMAT_VERSION", "ModelFileError", "check_export_target",
    "default_checkpoint_path", "default_model_path", "export_checkpoint", "export_potential",
    "load_exported", "read_metadata", "resolve_checkpoint",
]
