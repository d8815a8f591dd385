"""The redo rule's comparison (pipelines/segmentation/provenance.py) on ledger tables."""

from __future__ import annotations

from datetime import datetime, timezone

import pyarrow as pa

from deeplab_core.constants import CRFParams
from pipelines.segmentation import ledger, provenance

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
ONE = provenance.settings_key((1.0,), False, "mean", None, False)
CRF = provenance.settings_key((1.0,), False, "mean", CRFParams(), False)


def _settled(*rows: tuple[str, str, str | None, str | None, str | None]) -> pa.Table:
    entries = [ledger.ledger_row(i, f"u/{i}", 1, None, T0, status, None if status == "ok" else "read",
                                 None, 0, 3, "r", T0, model=model, settings=settings, crf_backend="torch")
               for i, status, model, settings, _ in rows]
    return pa.Table.from_pylist(entries, schema=ledger.LEDGER_SCHEMA)


def _listed(*ids: str) -> pa.Table:
    return pa.table({"id": list(ids), "uri": [f"u/{i}" for i in ids]})


def test_only_ok_entries_made_by_another_model_or_settings_differ():
    settled = _settled(("same", "ok", "m/1", ONE, None), ("model", "ok", "m/0", ONE, None),
                       ("settings", "ok", "m/1", CRF, None), ("old", "ok", None, None, None),
                       ("error", "error", "m/0", ONE, None))
    listed = _listed("same", "model", "settings", "old", "error", "new")
    other = provenance.made_differently(listed, settled, provenance.MadeBy("m/1", ONE))
    assert other.tolist() == [False, True, True, False, False, False]
    # A backend counts only when the run names one.
    named = provenance.made_differently(listed, settled, provenance.MadeBy("m/1", ONE, "pydensecrf"))
    assert named.tolist() == [True, True, True, True, False, False]


def test_the_line_names_what_differs():
    line = provenance.redo_line(2, {"model": "m/0", "settings": ONE}, provenance.MadeBy("m/1", CRF), "none")
    assert line.startswith("[segment] 2 settled input(s) were made differently (model m/0 -> m/1; crf null -> {")
    assert line.endswith("kept as they are (--redo none; --redo changed segments them again)")


def test_a_checkpoint_is_known_by_its_weights(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "model.pt").write_bytes(b"weights")
    (tmp_path / "b.pt").write_bytes(b"weights")
    assert provenance.model_identity(str(tmp_path / "a")) == provenance.model_identity(str(tmp_path / "b.pt"))
    assert provenance.model_identity("models:/deeplab/3") == "models:/deeplab/3"
