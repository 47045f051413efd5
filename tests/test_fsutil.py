"""flowercli.fsutil: the one file hash every stage uses (archives, manifests, the FID network)."""

from __future__ import annotations

import hashlib

from flowercli.fsutil import sha256_file


def test_sha256_file_matches_hashlib(tmp_path):
    # Past one 1 MiB read block and not a multiple of it, so the block loop and the tail both count.
    data = bytes(range(256)) * 4099 + b"tail"
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert sha256_file(empty) == hashlib.sha256(b"").hexdigest()
