"""The manual (README.md, docs/, mkdocs.yml): it builds, and its configuration reference is the
one queueworker/settings.py reads."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import manual

ROOT = manual.ROOT
SETTINGS = (ROOT / "queueworker" / "settings.py").read_text()
# Every variable settings.py reads is spelled out as a string literal (env.int("QW_X", …) or a
# loop over a tuple of names).
READ_NAMES = re.compile(r'"((?:QW|DJANGO|CELERY|DATABASE|CACHE|LOG)_[A-Z0-9_]*[A-Z0-9])"')
# ATTRIBUTE = env.kind("NAME", …): which setting holds which variable's value.
ASSIGNED = re.compile(r'^([A-Z][A-Z0-9_]*)(?: = [A-Z][A-Z0-9_]*)* = env\.\w+\(\s*"(\w+)"', re.M)


def test_configuration_reference_lists_every_variable_settings_reads():
    read = set(READ_NAMES.findall(SETTINGS))
    assert "QW_LEASE_SECONDS" in read and "DATABASE_URL" in read  # the pattern still matches
    missing = read - manual.configuration_variables()
    assert not missing, f"settings.py reads these; add them to docs/configuration.md: {missing}"


def test_every_qw_variable_the_manual_mentions_is_in_the_reference():
    documented = manual.configuration_variables()
    # the chaos, soak and benchmark knobs belong to the test suite and bench/, not to the service
    tooling = {"QW_CHAOS_SCALE", "QW_CHAOS_OUTAGE_S", "QW_SOAK_SECONDS", "QW_SOAK_RATE"}
    mentioned = set(re.findall(r"\bQW_[A-Z0-9_]*[A-Z0-9]\b", manual.text()))
    mentioned = {n for n in mentioned if not n.startswith(("QW_SECRET_", "QW_BENCH_"))}
    assert mentioned - documented - tooling == set()


def _default_cell(cell: str) -> str | None:
    """The literal default of a reference row: its first `code` span, 'empty' or 'off'."""
    if cell.startswith("`"):
        return cell[1:].split("`", 1)[0]
    if cell.split(" ", 1)[0] in ("empty", "off"):
        return ""
    return None


def _same(documented: str, value: object) -> bool:
    if isinstance(value, bool):
        return documented == str(value).lower()
    if isinstance(value, int | float):
        return float(documented) == float(value)
    if value is None or value == [] or value == {}:
        return documented in ("", "{}", "[]")
    if isinstance(value, list):
        return documented.split(",") == [str(item) for item in value]
    return documented.lower() == str(value).lower()  # LOG_LEVEL info is logging's INFO


def test_reference_defaults_are_the_settings_defaults(tmp_path):
    # given settings loaded with none of the documented variables set
    pairs = [(attr, name) for attr, name in ASSIGNED.findall(SETTINGS)]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("QW_", "DJANGO_", "CELERY_", "DATABASE_", "CACHE_", "LOG_"))
    }
    # the production defaults (the embedded demo's differ, as the reference says); nothing
    # connects to these URLs while settings load
    env.update(
        QW_VAR_DIR=str(tmp_path / "var"),
        DATABASE_URL="postgres://docs@localhost/docs",
        CELERY_BROKER_URL="amqp://localhost//",
        DJANGO_SECRET_KEY="docs-test-placeholder-not-a-secret",
    )
    code = (
        "import json, sys\n"
        "import queueworker.settings as s\n"
        "out = {}\n"
        "for attr in sys.argv[1:]:\n"
        "    v = getattr(s, attr)\n"
        "    out[attr] = v if isinstance(v, (bool, int, float, str, list, dict, type(None))) "
        "else str(v)\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *{attr for attr, _ in pairs}],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    values = json.loads(done.stdout.strip().splitlines()[-1])
    rows = manual.configuration_rows()
    # then each row whose default is one literal shows the value settings.py ends up with
    # set above, or documented relative to the checkout
    given = {"QW_VAR_DIR", "QW_ARTIFACT_ROOT", "DATABASE_URL", "CELERY_BROKER_URL"}
    compared = 0
    for attr, name in pairs:
        if name in given or name not in rows:
            continue
        documented = _default_cell(rows[name][0])
        if documented is None:
            continue
        assert _same(documented, values[attr]), (name, documented, values[attr])
        compared += 1
    assert compared >= 40


def test_docs_name_no_file_outside_the_repository():
    for page in manual.pages():
        body = page.read_text()
        assert not re.search(r"\b(DESIGN|PERFORMANCE)(\.md| §)", body), page
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", body):
            if re.match(r"[a-z]+:", target):
                continue  # a URL, not a file
            assert (page.parent / target).exists(), (page.name, target)


def test_readme_stays_a_first_read():
    assert len(manual.README.read_bytes()) < 15_000
    readme = manual.README.read_text()
    for needed in ("make run", "make test", "DATABASE_URL", "CELERY_BROKER_URL", "docs/"):
        assert needed in readme, needed


@pytest.mark.skipif(
    shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None,
    reason="mkdocs is not installed (the docs dependency group)",
)
def test_mkdocs_build_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    done = subprocess.run(
        [mkdocs, "build", "--strict", "--quiet", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "configuration" / "index.html").exists()


def test_code_cites_only_documents_in_the_repository():
    tracked = subprocess.run(
        ["git", "ls-files", "*.py", "*.yaml", "*.yml", "*.toml", "Makefile", "Procfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    citing = re.compile(r"\b(DESIGN|PERFORMANCE)(\.md\b| §)")
    offenders = [
        name
        for name in tracked
        if name != "tests/unit/test_docs.py" and citing.search((ROOT / name).read_text())
    ]
    assert offenders == []
    for name in tracked:
        for target in re.findall(r"\bdocs/[a-z-]+\.md\b", (ROOT / name).read_text()):
            assert (ROOT / target).exists(), (name, target)
