import pytest

from quantlm.atomic import atomic_path, output_dir, write_text
from quantlm.errors import QuantlmError


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = write_text(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_output_dir_appears_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), output_dir(out) as work:
        (work / "x").write_text("1")
        raise RuntimeError("crash")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with output_dir(out) as work:
        (work / "x").write_text("1")
    assert (out / "x").read_text() == "1"
    with pytest.raises(QuantlmError, match="already exists; choose another --out or pass --overwrite"), \
            output_dir(out):
        pass
    with output_dir(out, overwrite=True) as work:
        (work / "y").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["y"]
