"""Storage without a server: protocols, options from env/config, redaction, local access checks.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from pipelines.common.redaction import redact
from pipelines.data.storage import (
    check_access,
    get_fs,
    merge_storage_options,
    pyarrow_filesystem,
    storage_options_from_env,
    StorageError,
    write_table,
)


def test_options_from_env_only_contain_what_is_set(clean_aws_env):
    assert storage_options_from_env("s3") == {}
    clean_aws_env.setenv("AWS_ENDPOINT_URL", "http://generic:1")
    clean_aws_env.setenv("AWS_ENDPOINT_URL_S3", "http://s3-specific:2")
    clean_aws_env.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    clean_aws_env.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    clean_aws_env.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t")
    assert storage_options_from_env("s3") == {
        "endpoint_url": "http://s3-specific:2",
        "client_kwargs": {"region_name": "eu-west-1"},
        "key": "AKIAEXAMPLE",
        "secret": "s3cr3t",
    }
    assert storage_options_from_env("gs") == {} and storage_options_from_env("file") == {}


def test_config_options_win_and_credentials_are_replaced_as_a_group():
    env = {"endpoint_url": "http://env:1", "key": "ENVKEY", "secret": "envsecret", "token": "envtok",
           "client_kwargs": {"region_name": "us-east-1", "verify": False}}
    config = {"endpoint_url": "http://cfg:2", "key": "CFGKEY", "secret": "cfgsecret",
              "client_kwargs": {"region_name": "eu-central-1"}}
    merged = merge_storage_options(env, config)
    assert merged["endpoint_url"] == "http://cfg:2"
    assert (merged["key"], merged["secret"]) == ("CFGKEY", "cfgsecret")
    assert "token" not in merged  # an env session token never pairs with config credentials
    assert merged["client_kwargs"] == {"region_name": "eu-central-1", "verify": False}
    assert merge_storage_options(env, {"endpoint_url": "http://cfg:2"})["token"] == "envtok"


def test_redact_replaces_secret_values_recursively():
    options = {
        "endpoint_url": "http://127.0.0.1:9000",
        "key": "AKIA123",
        "secret": "s3cr3t",
        "client_kwargs": {"region_name": "us-east-1", "aws_session_token": "T0K3N-value"},
        "aws_secret_access_key": "x",
        "tracking": [{"password": "pa55word", "user": "bob"}, ("credentials", {"credentials": {"a": 1}})],
        "db": "postgresql://bob:hunter2@db:5432/mlflow",
        "token": None,
        "author": "alice",
        "apiKey": "k3y-value",
    }
    out = redact(options)
    assert out["endpoint_url"] == "http://127.0.0.1:9000"
    assert out["key"] == out["secret"] == out["aws_secret_access_key"] == "***"
    assert out["client_kwargs"] == {"region_name": "us-east-1", "aws_session_token": "***"}
    assert out["tracking"][0] == {"password": "***", "user": "bob"}
    assert out["tracking"][1] == ("credentials", {"credentials": "***"})
    assert out["db"] == "postgresql://bob:***@db:5432/mlflow"
    assert out["token"] is None  # nothing to hide
    assert out["author"] == "alice" and out["apiKey"] == "***"  # whole words, camelCase too
    assert options["key"] == "AKIA123"  # the input is not modified
    for secret in ("AKIA123", "s3cr3t", "T0K3N-value", "hunter2", "pa55word", "k3y-value"):
        assert secret not in repr(out)


def test_check_access_local(tmp_path):
    check_access(str(tmp_path / "new" / "dir"))
    with pytest.raises(StorageError, match="does not exist"):
        check_access(str(tmp_path / "missing.parquet"), must_exist=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="not a directory"):
        check_access(str(tmp_path / "file" / "below"))


def test_pyarrow_filesystem_for_local_and_other_protocols(tmp_path):
    arrow_fs, path = pyarrow_filesystem(str(tmp_path / "x"))
    assert isinstance(arrow_fs, pafs.LocalFileSystem) and path == str(tmp_path / "x")
    arrow_fs, path = pyarrow_filesystem("memory://arrow-test/x.bin")
    assert isinstance(arrow_fs, pafs.PyFileSystem)
    with arrow_fs.open_output_stream(path) as out:
        out.write(b"abc")
    assert get_fs("memory://arrow-test/x.bin")[0].cat_file(path) == b"abc"


def test_unknown_table_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown table format"):
        write_table(pa.table({"a": [1]}), str(tmp_path / "t.xlsx"))
