"""`flowercli download`: fetch, verify and unpack Oxford 102 Flowers and its captions.

Steps, each safe to interrupt:
1. Resolve the sources (official URLs, a mirror folder/URL, a captions archive) and the checksum each
   must match (mirror's SHA256SUMS, else the official md5).                           -> sources.py
2. Fetch each archive into `<data>/.downloads/NAME.part` (HTTP with resume, or a local copy), verify
   it, and only then rename it to `NAME`. A bad download never replaces a good one.   -> fetch.py, http.py
3. Extract into a temporary folder beside the dataset, refusing hostile archive members, validate the
   result, write `manifest.json`, and rename the folder into place. A killed run leaves no half dataset
   under the final name.                             -> install.py, archive.py, validation.py, manifest.py
A later run with the same sources checks the manifest, the file counts and the archives' sha256, and
returns without extracting anything; so does a run whose new sources yield byte-identical archives
(only the manifest's record of the sources changes).

This module only re-exports. Each function looks names up in its own module, so a test that replaces
one (monkeypatch) replaces it there: `flowercli.download.install.validate`, not `flowercli.download.validate`.
(The validation module is not called validate.py: the function re-exported here would hide it.)
"""

from __future__ import annotations

from flowercli.download.archive import safe_extract
from flowercli.download.http import fetch_file
from flowercli.download.install import download
from flowercli.download.manifest import MANIFEST_SCHEMA, caption_set, summary
from flowercli.download.sources import (
    CAPTIONS_CANDIDATES,
    CAPTIONS_DRIVE_ID,
    CAPTIONS_NAME,
    DRIVE_DOWNLOAD_URL,
    OFFICIAL_BASE_URL,
    OFFICIAL_CLASSES,
    OFFICIAL_IMAGES,
    OFFICIAL_MD5,
    ROLES,
    Source,
    resolve_sources,
)
from flowercli.download.validation import validate

__all__ = [
    "CAPTIONS_CANDIDATES", "CAPTIONS_DRIVE_ID", "CAPTIONS_NAME", "DRIVE_DOWNLOAD_URL", "MANIFEST_SCHEMA",
    "OFFICIAL_BASE_URL", "OFFICIAL_CLASSES", "OFFICIAL_IMAGES", "OFFICIAL_MD5", "ROLES", "Source", "caption_set",
    "download", "fetch_file", "resolve_sources", "safe_extract", "summary", "validate",
]
