"""Small helpers shared by unit and integration tests."""

from __future__ import annotations

from pipelines.data.storage import get_fs


def put_placeholders(root_uri: str, options, relative_paths: list[str]) -> None:
    """Files with placeholder bytes at `relative_paths` under `root_uri` (importers only list)."""
    fs, base = get_fs(root_uri, options)
    for relative in relative_paths:
        path = f"{base}/{relative}"
        if fs.protocol[0] in ("file", "local"):
            fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, b"placeholder")
