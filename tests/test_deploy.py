"""Deployment files are well-formed: Compose schema, Dockerfile sources, systemd units."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from harness.paths import REPO_ROOT

COMPOSE = yaml.safe_load((REPO_ROOT / "docker-compose.yaml").read_text())
DOCKERFILES = sorted((REPO_ROOT / "deploy").glob("*.Dockerfile"))
UNITS = sorted((REPO_ROOT / "deploy" / "systemd").glob("*.service"))
CARD_DEVICES = {"/dev/axcl_host", "/dev/ax_mmb_dev", "/dev/msg_userdev"}


def test_compose_file_matches_the_compose_specification() -> None:
    schema = json.loads((REPO_ROOT / "tests" / "data" / "compose_spec.json").read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(COMPOSE)]
    assert errors == []
    # The schema really constrains services: a misspelt key is caught.
    broken = json.loads(json.dumps(COMPOSE))
    broken["services"]["llm-service"]["restart_policy"] = "always"
    assert not validator.is_valid(broken)


def test_card_service_has_the_devices_runtime_and_folders() -> None:
    service = COMPOSE["services"]["llm-service"]
    assert service["network_mode"] == "host"
    assert {d.split(":")[0] for d in service["devices"]} == CARD_DEVICES
    volumes = service["volumes"]
    assert "/usr/lib/axcl:/usr/lib/axcl:ro" in volumes
    assert "/usr/bin/axcl:/usr/bin/axcl:ro" in volumes
    assert any(v.endswith(":/app/model:ro") for v in volumes)
    assert service["environment"]["LD_LIBRARY_PATH"] == "/usr/lib/axcl"
    assert "/usr/bin/axcl" in service["environment"]["PATH"].split(":")
    assert service["environment"]["AXM1_HOST"].startswith("${AXM1_HOST:-127.0.0.1}")


@pytest.mark.parametrize(
    ("name", "port"),
    [("llm-service", 11535), ("llm-service-virtual", 11535), ("tokenizer-service", 8101)],
)
def test_services_restart_and_check_health(name: str, port: int) -> None:
    service = COMPOSE["services"][name]
    assert service["restart"] == "unless-stopped"
    assert f"http://127.0.0.1:{port}/health" in " ".join(service["healthcheck"]["test"])


def test_virtual_card_profile_runs_without_devices() -> None:
    virtual = COMPOSE["services"]["llm-service-virtual"]
    assert virtual["profiles"] == ["virtual-card"]
    assert "devices" not in virtual
    assert COMPOSE["services"]["llm-service"]["profiles"] == ["card"]
    for volume in virtual["volumes"]:
        source = volume.split(":")[0]
        assert (REPO_ROOT / source).exists(), f"virtual-card mounts a missing {source}"


def test_virtual_card_descriptor_names_existing_model_folders() -> None:
    entries = json.loads((REPO_ROOT / "deploy" / "virtual-card" / "model-descriptor.json").read_text())
    assert entries
    for entry in entries:
        model = REPO_ROOT / "model" / entry["model_path"]
        assert (model / entry["run_cmd"]).is_file()
        assert (REPO_ROOT / "model" / entry["tokenizer_path"] / entry["tokenizer_py"]).is_file()
        # The image leaves torch out, so only the scripted text engine can run there.
        assert "--emu_engine scripted" in (model / entry["run_cmd"]).read_text()


def test_compose_builds_the_dockerfiles_that_exist() -> None:
    for service in COMPOSE["services"].values():
        if "build" in service:
            assert (REPO_ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_copies_only_existing_paths(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.MULTILINE)
    assert "--no-cache-dir" in text
    assert re.search(r"^USER (?!root)\S+", text, re.MULTILINE), "the image must not run as root"
    copies = re.findall(r"^COPY (?!--from)(.+)$", text, re.MULTILINE)
    assert copies
    for line in copies:
        *sources, _destination = line.split()
        for source in sources:
            assert (REPO_ROOT / source).exists(), f"{dockerfile.name} copies missing {source}"


def test_dockerfiles_cover_the_packages_setuptools_needs() -> None:
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        for package in ("llm_service", "tokenizer_service", "ax_emulator"):
            assert f"COPY {package} " in text, f"{dockerfile.name}: pip install . needs {package}"


def _units_with_local_executable(tmp_path: Path) -> list[Path]:
    """Copies of the units whose ExecStart points at this environment's axm1-llm, which
    `systemd-analyze verify` requires to exist."""
    installed = Path(sys.executable).parent / "axm1-llm"
    copies = []
    for unit in UNITS:
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace("/opt/axm1-llm/.venv/bin/axm1-llm", str(installed)))
        copies.append(copy)
    return copies


def test_systemd_units_verify(tmp_path: Path) -> None:
    assert [u.name for u in UNITS] == ["axm1-llm.service", "axm1-tokenizer-service.service"]
    copies = _units_with_local_executable(tmp_path)
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed; test_systemd_units_structure still runs")
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, copies)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_systemd_units_structure() -> None:
    for unit in UNITS:
        text = unit.read_text()
        assert {"[Unit]", "[Service]", "[Install]"} <= set(re.findall(r"^\[\w+\]$", text, re.MULTILINE))
        assert re.search(r"^ExecStart=/opt/axm1-llm/\.venv/bin/axm1-llm ", text, re.MULTILINE)
        assert re.search(r"^User=axm1$", text, re.MULTILINE)
    daemon = (REPO_ROOT / "deploy" / "systemd" / "axm1-llm.service").read_text()
    assert "Environment=LD_LIBRARY_PATH=/usr/lib/axcl" in daemon
    assert re.search(r"^Environment=PATH=.*:/usr/bin/axcl:", daemon, re.MULTILINE)
    assert "Requires=axm1-tokenizer-service.service" in daemon


def test_readme_contents_list_matches_its_sections() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    listed = re.findall(r"^- \[[^\]]+\]\(#([\w-]+)\)$", readme, re.MULTILINE)
    sections = [
        re.sub(r"[^\w -]", "", title).strip().lower().replace(" ", "-")
        for title in re.findall(r"^## (.+)$", readme.split("## Contents", 1)[1], re.MULTILINE)
    ]
    assert listed == sections
