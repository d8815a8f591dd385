"""Every whole-input error of the jobs ends as one line on stderr naming the file or URI, exit 2,
before Ray starts, and never shows a password written into a URI."""

from __future__ import annotations

import socket
import time
from contextlib import closing

import numpy as np
import pytest
from PIL import Image

from deeplab_core import build_model
from pipelines import segment, train
from pipelines.data.checkpoints import save_checkpoint_dir


@pytest.fixture(autouse=True)
def no_ray():
    """The job must not start Ray (checkable when no earlier test of the session connected one)."""
    import ray

    connected_before = ray.is_initialized()
    yield
    if not connected_before:
        assert not ray.is_initialized(), "a whole-input error must stop before Ray starts"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    model = build_model("deeplabv3plus", backbone="mobilenetv2", num_classes=6, width_mult=0.25)
    return str(save_checkpoint_dir(model, tmp_path_factory.mktemp("ckpt")))


@pytest.fixture
def images(tmp_path) -> str:
    folder = tmp_path / "incoming"
    folder.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "a.png")
    return str(folder)


def closed_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_error_line(capsys, code: int, expected_code: int = 2) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == expected_code and len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def run_segment(capsys, *args: str) -> str:
    return one_error_line(capsys, segment.main(["--model", "unused", *args]))


def test_missing_input_folder(capsys, tmp_path):
    line = run_segment(capsys, "--input", str(tmp_path / "typo"), "--output", str(tmp_path / "out"))
    assert line == f"segment.py: error: cannot use {tmp_path / 'typo'}: does not exist"


@pytest.mark.parametrize(("content", "message"), [
    ("", "cannot read: Empty CSV file"),
    ("id,image_uri\na,x.jpg\na,y.jpg\n", "1 duplicate id(s), e.g. ['a']"),
    ("name,path\na,x.jpg\n", "missing"),
])
def test_bad_manifests(capsys, tmp_path, content, message):
    manifest = tmp_path / "m.csv"
    manifest.write_text(content)
    line = run_segment(capsys, "--input", str(manifest), "--output", str(tmp_path / "out"))
    assert str(manifest) in line and message.replace("cannot read", "cannot be read") in line


def test_unknown_scheme(capsys, tmp_path):
    line = run_segment(capsys, "--input", "foo://bucket/x", "--output", str(tmp_path / "out"))
    assert "foo://bucket/x" in line and "Protocol not known: foo" in line


def test_password_in_a_uri_is_never_shown(capsys, tmp_path):
    line = run_segment(capsys, "--input", "s3://AKIDEXAMPLE:TopSecret123@bucket/m.csv", "--output", str(tmp_path / "o"))
    assert "TopSecret123" not in line and "***" in line


def test_output_that_cannot_be_written(capsys, tmp_path, images):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = run_segment(capsys, "--input", images, "--output", str(blocker / "out"))
    assert str(blocker) in line and "not a directory" in line


def test_missing_and_truncated_models(capsys, tmp_path, images, checkpoint):
    code = segment.main(["--model", str(tmp_path / "nope"), "--input", images, "--output", str(tmp_path / "o1")])
    assert "cannot load model" in one_error_line(capsys, code)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    payload = open(f"{checkpoint}/model.pt", "rb").read()
    (truncated / "model.pt").write_bytes(payload[: len(payload) // 3])
    code = segment.main(["--model", str(truncated), "--input", images, "--output", str(tmp_path / "o2")])
    line = one_error_line(capsys, code)
    assert line.startswith(f"segment.py: error: cannot load model {truncated}")


def test_registry_alias_that_does_not_exist(capsys, tmp_path, images, sqlite_tracking_uri):
    args = ["--model", "models:/deeplab@nope", "--tracking-uri", sqlite_tracking_uri, "--input", images,
            "--output", str(tmp_path / "o")]
    assert "no MLflow database at" in one_error_line(capsys, segment.main(args))  # not created empty
    import mlflow

    mlflow.MlflowClient(sqlite_tracking_uri).search_experiments()  # now the database exists
    assert "cannot load model models:/deeplab@nope" in one_error_line(capsys, segment.main(args))


def test_unreachable_mlflow_fails_in_seconds_for_both_jobs(capsys, tmp_path, images, checkpoint):
    server = f"http://user:Hunter2pw@127.0.0.1:{closed_port()}"
    start = time.monotonic()
    code = segment.main(["--model", checkpoint, "--input", images, "--output", str(tmp_path / "o"),
                         "--tracking-uri", server])
    line = one_error_line(capsys, code)
    assert "is unreachable" in line and "Hunter2pw" not in line
    code = train.main([f"tracking.tracking_uri={server}", f"run.storage_path={tmp_path / 'runs'}",
                       f"data.root={tmp_path / 'data'}"])
    line = one_error_line(capsys, code)
    assert line.startswith("train.py: error: MLflow tracking server http://user:***@127.0.0.1:")
    assert time.monotonic() - start < 30


def test_misspelled_overrides(capsys, tmp_path):
    line = one_error_line(capsys, train.main(["optim.base_lrr=0.1"]))
    assert line == "train.py: error: unknown key optim.base_lrr; did you mean optim.base_lr?"
    line = run_segment(capsys, "--input", "i", "--output", "o", "crf_params.bi_ww=1")
    assert line == "segment.py: error: unknown key crf_params.bi_ww; did you mean crf_params.bi_w?"


def test_an_existing_empty_folder_is_a_quiet_success(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert segment.main(["--model", "unused", "--input", str(tmp_path / "empty"), "--output", str(tmp_path / "o")]) == 0
    assert "read 0 = ok 0" in capsys.readouterr().out


def test_debug_shows_the_traceback_without_the_password(capsys, tmp_path):
    code = segment.main(["--debug", "--model", "m", "--input", "s3://AKID:TopSecret123@bucket/m.csv",
                         "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and "TopSecret123" not in err
