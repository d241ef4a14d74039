"""The services folder holder (services/folder.py) on a real folder: only changed manifests are
re-read, the catalog reuses what did not change, a template is read at each use; and the byte
estimate of services/run.py. No daemon."""
from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import pytest

from llm_service.services.folder import ServiceFolder
from llm_service.services.run import ESTIMATE_BYTES_PER_TOKEN, estimate_tokens

MANIFEST = {"type": "map", "fields": [{"name": "text", "chunked": True}],
            "flavors": {"f": {"model": "m", "totalContextLength": 512, "maxGenerationLength": 100,
                              "createNewTurnAfter": 100}}}


def make(folder: Path, name: str, manifest: dict | str = MANIFEST, template: str | None = "{{ text }}") -> None:
    (folder / f"{name}.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    if template is not None:
        (folder / f"{name}.txt").write_text(template)


def test_unchanged_manifests_are_neither_re_read_nor_parsed_again(tmp_path, monkeypatch):
    make(tmp_path, "a")
    make(tmp_path, "b")
    folder = ServiceFolder(tmp_path, 1.0)
    first = folder.refresh()
    assert set(first.usable()) == {"a", "b"} and folder.folder_error is None
    reads: list[str] = []
    original = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: reads.append(self.name) or original(self, *a, **k))
    second = folder.refresh()
    assert reads == []
    assert second.services["a"] is first.services["a"] and second.services["b"] is first.services["b"]
    make(tmp_path, "b", {**MANIFEST, "description": "new"}, template=None)
    third = folder.refresh()
    assert reads == ["b.json"]
    assert third.services["a"] is first.services["a"] and third.usable()["b"].description == "new"


def test_an_edit_that_keeps_the_mtime_is_still_seen(tmp_path):
    make(tmp_path, "a")
    folder = ServiceFolder(tmp_path, 1.0)
    folder.refresh()
    path = tmp_path / "a.json"
    stat = path.stat()
    path.write_text(json.dumps({**MANIFEST, "description": "a longer description than before"}))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime, another size
    assert folder.refresh().usable()["a"].description == "a longer description than before"


def test_broken_removed_and_odd_files(tmp_path):
    make(tmp_path, "good")
    make(tmp_path, "bad", '{"type": "map",')
    make(tmp_path, "notemplate", template=None)
    (tmp_path / ".good.json.swp").write_text("junk")
    (tmp_path / "README.md").write_text("not a service")
    (tmp_path / "Upper.json").write_text(json.dumps(MANIFEST))
    (tmp_path / "orphan.txt").write_text("{{ text }}")
    folder = ServiceFolder(tmp_path, 1.0)
    catalog = folder.refresh()
    assert set(catalog.services) == {"good", "bad", "notemplate"} and set(catalog.usable()) == {"good"}
    assert catalog.services["bad"].error.startswith(f"{tmp_path}/bad.json: invalid JSON at line 1")
    assert catalog.services["notemplate"].error == f"{tmp_path}/notemplate.json: its template {tmp_path}/notemplate.txt is missing"
    assert any(w.startswith(f"{tmp_path}/Upper.json: not a service") for w in catalog.warnings)
    assert f"{tmp_path}/orphan.txt: a template without a manifest (orphan.json)" in catalog.warnings
    (tmp_path / "good.json").unlink()
    assert "good" not in folder.refresh().services and folder.modified_ns("good") is None


def test_a_template_is_read_at_each_use(tmp_path):
    make(tmp_path, "a", template="one {{ text }}")
    folder = ServiceFolder(tmp_path, 1.0)
    folder.refresh()
    assert folder.template("a") == ("one {{ text }}", f"{tmp_path}/a.txt")
    (tmp_path / "a.txt").write_text("two {{ text }}")
    assert folder.template("a")[0] == "two {{ text }}"
    (tmp_path / "a.txt").unlink()
    with pytest.raises(OSError):
        folder.template("a")


def test_a_missing_folder_is_no_services_with_its_reason(tmp_path):
    folder = ServiceFolder(tmp_path / "absent", 1.0)
    assert folder.refresh().services == {}
    assert folder.folder_error == f"services folder {tmp_path / 'absent'} does not exist: no services"
    (tmp_path / "absent").mkdir()
    make(tmp_path / "absent", "late")
    assert set(folder.refresh().usable()) == {"late"} and folder.folder_error is None


@pytest.mark.anyio
async def test_the_watcher_picks_up_a_new_manifest(tmp_path):
    folder = ServiceFolder(tmp_path, 0.05)
    async with anyio.create_task_group() as tg:
        await tg.start(folder.run)
        assert folder.catalog.services == {}
        make(tmp_path, "new")
        with anyio.fail_after(5):
            while "new" not in folder.catalog.usable():
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()


@pytest.mark.parametrize(("text", "expected"), [
    ("", 0), ("abc", 1), ("abcd", 2), ("é", 1), ("日本語", 3), ("x" * 300, 100),
])
def test_the_byte_estimate_rounds_up(text, expected):
    assert ESTIMATE_BYTES_PER_TOKEN == 3
    assert estimate_tokens(text) == expected


def test_the_daemon_and_its_catalog_do_without_jinja2_until_a_template_is_used():
    import subprocess
    import sys

    probe = ("import sys, llm_service.app; from llm_service.services.folder import ServiceFolder; "
             "catalog = ServiceFolder('services', 1).refresh(); assert catalog.usable(), catalog; "
             "print('jinja2' in sys.modules)")
    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
