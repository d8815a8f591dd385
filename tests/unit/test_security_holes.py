"""The smaller holes of a shared deployment (issue 22), each checked where it is closed."""

from __future__ import annotations

import pytest

from pipelines.segmentation.io import check_id


@pytest.mark.parametrize("bad", ["a?versionId=3", "b#frag", "c*", "d[1]", "e{x}", "f%2Fg"])
def test_ids_with_characters_special_to_a_store_are_refused(bad):
    """`a?versionId=3` would be written as `masks/a` on S3: another id's mask, never finished."""
    with pytest.raises(ValueError, match="special to URLs"):
        check_id(bad)


AZURE = "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=c2VjcmV0S2V5MTIz;EndpointSuffix=core.windows.net"


def test_secret_option_names_of_every_supported_store_are_redacted():
    from pipelines.common.redaction import redact, REDACTED

    options = {
        "s3": {"key": "AKIAX", "secret": "s3cr3t", "token": "t0k3n", "client_kwargs": {"region_name": "x"}},
        "gcs": {"token": {"private_key": "-----BEGIN", "client_email": "a@b"}, "project": "p"},
        "azure": {"connection_string": AZURE, "account_key": "k3y", "sas_token": "sv=1&sig=abc",
                  "client_secret": "cs", "account_name": "acct"},
        "url": "https://user:hunter2pw@host/data/val.parquet",
    }
    text = str(redact(options))
    for secret in ("AKIAX", "s3cr3t", "t0k3n", "-----BEGIN", "c2VjcmV0S2V5MTIz", "k3y", "sig=abc", "hunter2pw"):
        assert secret not in text, secret
    assert REDACTED in text and "acct" in text and "region_name" in text  # only the secrets go


def test_connection_strings_and_sas_urls_in_free_text_are_redacted():
    from pipelines.common.redaction import redact_urls

    line = f"cannot open {AZURE} or https://acct.blob.core.windows.net/c/m.parquet?sv=2024&sig=AbC%2Bd"
    shown = redact_urls(line)
    assert "c2VjcmV0S2V5MTIz" not in shown and "AbC%2Bd" not in shown
    assert "AccountName=acct" in shown and "sv=2024" in shown


def test_the_fingerprint_file_holds_no_password(tmp_path):
    from pipelines.training.config import TrainConfig
    from pipelines.training.resume import fingerprint

    cfg = TrainConfig.model_validate({"data": {"train_manifest": "https://u:hunter2pw@host/train.parquet",
                                               "val_manifest": "https://u:hunter2pw@host/val.parquet"}})
    values = fingerprint(cfg)
    assert "hunter2pw" not in str(values)
    assert values["data.train_manifest"] == "https://u:***@host/train.parquet"


def test_more_than_255_classes_is_refused_at_config_time():
    """Masks are uint8 with 255 = ignore: class 256 would be written as 0."""
    from pipelines.common.config import ConfigError, load_config
    from pipelines.promotion.weights_import import ImportWeightsConfig
    from pipelines.training.config import TrainConfig

    assert TrainConfig.model_validate({"model": {"num_classes": 255}}).model.num_classes == 255
    with pytest.raises(ConfigError, match="num_classes"):
        load_config(TrainConfig, None, ["model.num_classes=256"])
    with pytest.raises(ConfigError, match="num_classes"):
        load_config(ImportWeightsConfig, None, [], {"kind": "vainf", "uri": "x.pth", "arch": "deeplabv3plus",
                                                     "num_classes": 300})


def test_a_checkpoint_with_more_than_255_classes_is_refused_on_load():
    from pipelines.data.checkpoints import build_from_payload

    with pytest.raises(ValueError, match="300 classes"):
        build_from_payload({"model": {}, "model_config": {"arch": "deeplabv3", "num_classes": 300}})


def test_a_file_over_the_byte_cap_is_an_error_record_and_is_not_read_whole(tmp_path, monkeypatch):
    """A valid 8x8 PNG followed by 3 MiB of padding: decoders would accept it, after reading all."""
    import io

    import numpy as np
    from PIL import Image

    from pipelines.data import rows

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format="PNG")
    (tmp_path / "big.png").write_bytes(buffer.getvalue() + b"\0" * (3 * 1024**2))
    (tmp_path / "small.png").write_bytes(buffer.getvalue())
    read_sizes = []
    original = rows._capped
    monkeypatch.setattr(rows, "_capped", lambda content, cap: read_sizes.append(len(content)) or original(content, cap))
    monkeypatch.setenv(rows.MAX_FILE_BYTES_ENV, str(1024**2))
    decoder = rows.RowDecoder(None, None, 10**8, require_masks=False)
    big, small = decoder.decode_rows(["big", "small"], [str(tmp_path / "big.png"), str(tmp_path / "small.png")])
    assert big.error is not None and big.error.stage == "read" and "1 MiB per-file cap" in big.error.reason
    assert small.error is None and small.image.shape == (8, 8, 3)
    assert max(read_sizes) <= 1024**2 + 1  # a ranged read: the rest of the file never came in
    monkeypatch.delenv(rows.MAX_FILE_BYTES_ENV)
    assert rows.RowDecoder(None, None, 10**8, require_masks=False).max_bytes == rows.DEFAULT_MAX_FILE_BYTES
