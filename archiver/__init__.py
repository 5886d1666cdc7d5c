"""marserve's model archiver: build and open TorchServe-compatible ``.mar`` archives.

The server reads archives through this package too, so the rules for what a valid,
safe archive is live in one place.
"""

from .build import ARCHIVE_FORMATS, ArchiveSpec, build_archive, collect_entries
from .errors import ArchiveError, one_line
from .extract import ExtractLimits, ModelArchive, model_name_from_path, open_archive, read_manifest
from .manifest import MANIFEST_PATH, Manifest, ModelSection, check_model_name, parse_manifest
from .paths import PATH_FIELDS, archive_path, check_manifest_paths, handler_module

__all__ = [
    "ARCHIVE_FORMATS",
    "MANIFEST_PATH",
    "PATH_FIELDS",
    "ArchiveError",
    "ArchiveSpec",
    "ExtractLimits",
    "Manifest",
    "ModelArchive",
    "ModelSection",
    "archive_path",
    "build_archive",
    "check_manifest_paths",
    "check_model_name",
    "collect_entries",
    "handler_module",
    "model_name_from_path",
    "one_line",
    "open_archive",
    "parse_manifest",
    "read_manifest",
]
