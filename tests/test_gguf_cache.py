"""The GGUF cache's own decisions (workers/gguf_cache.py): which folder a file gets, when it is
converted, and what happens when the cache cannot be written. The conversion itself runs for
real wherever the suite loads SmolLM2 (the `checkpoint` fixture, the workers, the emulator)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from workers import gguf_cache


def test_a_file_changed_or_moved_gets_a_folder_of_its_own(tmp_path: Path) -> None:
    gguf = tmp_path / "model.Q4.gguf"
    gguf.write_bytes(b"GGUF one")
    first = gguf_cache.cache_name(gguf)
    assert first.startswith("model.Q4-") and first == gguf_cache.cache_name(gguf)
    gguf.write_bytes(b"GGUF two, longer")
    assert gguf_cache.cache_name(gguf) != first
    second = gguf_cache.cache_name(gguf)
    (tmp_path / "copy").mkdir()
    copy = tmp_path / "copy" / gguf.name
    copy.write_bytes(gguf.read_bytes())
    os.utime(copy, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns))  # same size and time, other place
    assert gguf_cache.cache_name(copy) not in (first, second)


def test_the_cache_is_under_xdg_cache_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert gguf_cache.cache_root() == tmp_path / "axm1-llm" / "gguf"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert gguf_cache.cache_root() == Path.home() / ".cache" / "axm1-llm" / "gguf"


def test_converted_once_then_read_as_is(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    conversions = []

    def fake_convert(source: Path, out_dir: Path) -> None:  # the real one needs torch and seconds
        conversions.append(source)
        out_dir.mkdir()
        (out_dir / gguf_cache.COMPLETE).write_text("{}")

    monkeypatch.setattr(gguf_cache, "convert", fake_convert)
    root = tmp_path / "cache"
    first = gguf_cache.dense_checkpoint(gguf, root)
    assert first is not None and (first / gguf_cache.COMPLETE).is_file()
    assert gguf_cache.dense_checkpoint(gguf, root) == first
    assert conversions == [gguf]
    assert not list(root.glob("*.partial"))


def test_a_conversion_cut_short_is_done_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    root = tmp_path / "cache"
    root.mkdir()
    partial = root / f"{gguf_cache.cache_name(gguf)}.partial"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")  # a conversion killed half way

    def fake_convert(source: Path, out_dir: Path) -> None:
        assert not out_dir.exists()  # what was left is gone first
        out_dir.mkdir()
        (out_dir / gguf_cache.COMPLETE).write_text("{}")

    monkeypatch.setattr(gguf_cache, "convert", fake_convert)
    out = gguf_cache.dense_checkpoint(gguf, root)
    assert out is not None and sorted(p.name for p in out.iterdir()) == [gguf_cache.COMPLETE]


def test_a_cache_that_cannot_be_written_loads_the_gguf_itself(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                              capfd: pytest.CaptureFixture[str]) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache's folder would go")
    monkeypatch.setattr(gguf_cache, "convert", lambda *_: pytest.fail("converted into an unusable cache"))
    assert gguf_cache.dense_checkpoint(gguf, blocker / "gguf") is None
    assert "is not usable" in capfd.readouterr().err


def test_a_file_that_cannot_be_converted_is_loaded_as_it_is(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                           capfd: pytest.CaptureFixture[str]) -> None:
    """A GGUF transformers loads but the conversion trips on (an architecture it cannot rebuild
    dense, say) must not stop the load: nothing is cached, and the next start tries again."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")

    def failing_convert(source: Path, out_dir: Path) -> None:
        out_dir.mkdir()
        raise ValueError("no dense class for this architecture")

    monkeypatch.setattr(gguf_cache, "convert", failing_convert)
    root = tmp_path / "cache"
    assert gguf_cache.dense_checkpoint(gguf, root) is None
    assert "could not be converted" in capfd.readouterr().err
    assert [p.name for p in root.iterdir()] == [f"{gguf_cache.cache_name(gguf)}.lock"]
