"""The one row decoder of every job: manifest rows -> validated arrays, or an error record.

Training, validation and batch segmentation all read rows `{id, image_uri, mask_uri}` through
`RowDecoder`, so a file is judged the same way everywhere (decode.py's rules), and every failure
becomes an `ErrorRecord {id, uri, stage, reason}` rather than an exception.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pyarrow as pa

from pipelines.data.decode import BadInput, decode_image, decode_mask
from pipelines.data.errors import ErrorRecord
from pipelines.common.redaction import scrub
from pipelines.data.storage import get_fs


# Largest file a row may read: a few-KiB header can claim a small image in a 200 MiB file, and
# each worker would hold all of it. Reads are ranged, so a larger file costs at most this much.
DEFAULT_MAX_FILE_BYTES = 64 * 1024**2
MAX_FILE_BYTES_ENV = "DEEPLAB_MAX_FILE_BYTES"


def max_file_bytes() -> int:
    """The per-file byte cap: $DEEPLAB_MAX_FILE_BYTES (set it on the cluster's nodes), else 64 MiB."""
    text = os.environ.get(MAX_FILE_BYTES_ENV, "")
    return int(text) if text.isdigit() and int(text) > 0 else DEFAULT_MAX_FILE_BYTES


class FileTooLarge(ValueError):
    """A file over the per-file byte cap; only its first cap + 1 bytes were read."""


def object_array(values: Sequence[Any]) -> np.ndarray:
    """A 1-D object array of arrays: how Ray Data batches carry images of differing shapes
    (np.array would stack same-shaped ones into one block)."""
    out = np.empty(len(values), dtype=object)
    for index, value in enumerate(values):
        out[index] = value
    return out


@dataclass
class Decoded:
    """One manifest row after reading and decoding: arrays, or the error that stopped it."""

    image: np.ndarray | None = None
    mask: np.ndarray | None = None
    error: ErrorRecord | None = None


class RowDecoder:
    """Reads a batch of manifest rows (all files of a batch fetched concurrently) and decodes them.

    Holds the storage options, so its ``repr`` never shows its state.
    """

    def __init__(
        self,
        storage_options: Mapping[str, Any] | None,
        num_classes: int | None,
        max_pixels: int,
        require_masks: bool,
        read_masks: bool = True,
        max_bytes: int | None = None,
    ) -> None:
        self._storage_options = dict(storage_options or {})
        self.max_bytes = max_bytes or max_file_bytes()
        self.num_classes = num_classes
        self.max_pixels = max_pixels
        self.require_masks = require_masks
        self.read_masks = read_masks

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_classes={self.num_classes})"

    def decode_batch(self, batch: pa.Table) -> list[Decoded]:
        """Decodes an Arrow batch of manifest rows (columns id, image_uri, mask_uri)."""
        mask_uris = batch.column("mask_uri").to_pylist() if self.read_masks else None
        return self.decode_rows(batch.column("id").to_pylist(), batch.column("image_uri").to_pylist(),
                                mask_uris)

    def decode_rows(self, ids: Sequence[str], image_uris: Sequence[str],
                    mask_uris: Sequence[str | None] | None = None) -> list[Decoded]:
        """One `Decoded` per row; an empty or missing mask URI means "no mask"."""
        # Ray runs one task per CPU: OpenCV's own thread pool would oversubscribe the node.
        cv2.setNumThreads(1)
        if mask_uris is None or not self.read_masks:
            mask_uris = [None] * len(ids)
        mask_uris = [uri or None for uri in mask_uris]
        contents = fetch_all(list(image_uris) + mask_uris, self._storage_options, self.max_bytes)
        image_data, mask_data = contents[: len(ids)], contents[len(ids):]
        return [
            self._decode_row(*row)
            for row in zip(ids, image_uris, mask_uris, image_data, mask_data)
        ]

    def _decode_row(self, row_id, image_uri, mask_uri, image_data, mask_data) -> Decoded:
        if isinstance(image_data, BaseException):
            return Decoded(error=self._read_error(row_id, image_uri, image_data))
        try:
            image = decode_image(image_data, self.max_pixels)
        except BadInput as bad:
            return Decoded(error=ErrorRecord(row_id, image_uri, bad.stage, bad.reason))
        if mask_uri is None:
            if self.require_masks:
                return Decoded(error=ErrorRecord(row_id, image_uri, "mask",
                                                 "no mask_uri in the manifest"))
            return Decoded(image=image)
        if isinstance(mask_data, BaseException):
            return Decoded(error=self._read_error(row_id, mask_uri, mask_data))
        try:
            mask = decode_mask(mask_data, self.num_classes, image.shape)
        except BadInput as bad:
            return Decoded(error=ErrorRecord(row_id, mask_uri, bad.stage, bad.reason))
        return Decoded(image=image, mask=mask)

    def _read_error(self, row_id: str, uri: str, err: BaseException) -> ErrorRecord:
        if isinstance(err, FileNotFoundError):
            reason = "file not found"
        elif isinstance(err, FileTooLarge):
            reason = str(err)
        elif isinstance(err, PermissionError):
            reason = "access denied"
        else:
            reason = scrub(f"{type(err).__name__}: {err}", self._storage_options)
        return ErrorRecord(row_id, uri, "read", reason)


def fetch_all(
    uris: Sequence[str | None], storage_options: Mapping[str, Any] | None = None, max_bytes: int | None = None,
) -> list[bytes | BaseException | None]:
    """The bytes of every URI (None stays None; a failure is returned, not raised). Files on an
    async filesystem (s3, gcs, http) are fetched concurrently: object stores are latency-bound.
    With `max_bytes`, at most max_bytes + 1 bytes are read (a ranged read) and a longer file is a
    FileTooLarge."""
    results: list[bytes | BaseException | None] = [None] * len(uris)
    groups: dict[int, tuple[Any, list[tuple[int, str]]]] = {}
    for index, uri in enumerate(uris):
        if uri is None:
            continue
        try:
            fs, path = get_fs(uri, storage_options)
        except Exception as err:  # noqa: BLE001 - an unusable URI is this row's error
            results[index] = err
            continue
        groups.setdefault(id(fs), (fs, []))[1].append((index, path))
    for fs, items in groups.values():
        paths = [path for _, path in items]
        if getattr(fs, "async_impl", False):
            from fsspec.asyn import sync

            contents = sync(fs.loop, _cat_concurrently, fs, paths, max_bytes)
        else:
            contents = [_cat_or_error(fs, path, max_bytes) for path in paths]
        for (index, _), content in zip(items, contents):
            results[index] = _capped(content, max_bytes)
    return results


def _range(max_bytes: int | None) -> dict[str, int]:
    return {} if max_bytes is None else {"start": 0, "end": max_bytes + 1}


def _capped(content: bytes | BaseException, max_bytes: int | None) -> bytes | BaseException:
    # A ranged GET of a zero-byte object is "416 range not satisfiable" on S3: the file is empty,
    # which the decoder reports as such (an image error), not a read failure.
    if max_bytes is not None and isinstance(content, OSError) and "range is not satisfiable" in str(content).lower():
        return b""
    if max_bytes is not None and isinstance(content, bytes) and len(content) > max_bytes:
        return FileTooLarge(f"file is larger than the {max_bytes / 1024**2:g} MiB per-file cap "
                            f"(${MAX_FILE_BYTES_ENV}); not read")
    return content


async def _cat_concurrently(fs, paths: list[str], max_bytes: int | None) -> list[bytes | BaseException]:
    return await asyncio.gather(*(fs._cat_file(path, **_range(max_bytes)) for path in paths),
                                return_exceptions=True)


def _cat_or_error(fs, path: str, max_bytes: int | None) -> bytes | BaseException:
    try:
        return fs.cat_file(path, **_range(max_bytes))
    except Exception as err:  # noqa: BLE001 - returned, like the async branch
        return err


