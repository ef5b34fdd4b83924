"""The documentation agrees with the code: docs/REFERENCE.md, the README and docs/.

- every configuration key the parser reads has a row in docs/REFERENCE.md,
  its documented default is one the parser accepts, and the keys documented
  as needing a restart are exactly cluster/reload.py's list;
- every reply of worker/replies.py and every command of the CLI is listed;
- the README and docs/ name no file the repository lacks.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from cluster import validate
from cluster.cli import build_parser
from cluster.reload import RESTART_ONLY
from cluster.settings import parse_settings
from cluster.validate import ConfigError

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = (ROOT / "docs" / "REFERENCE.md").read_text()
# Made by the gateway or the demo at run time, never committed.
MADE_AT_RUN_TIME = ("examples/tls/", "examples/mail/", "examples/spool/", ".venv/")


def configuration_rows() -> dict[str, tuple[str, str]]:
    """key -> (default cell, SIGHUP cell) of the configuration table."""
    section = REFERENCE.split("## 2. Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `([a-z_]+\.[a-z_]+)` \| (.*?) \| (.*?) \| .* \|$", line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(3))
    return rows


def keys_the_parser_reads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> set[str]:
    seen: set[str] = set()
    original = validate.Section.raw

    def recording(self: validate.Section, name: str, default: Any = None) -> Any:
        if self.prefix:
            seen.add(re.sub(r"\[\d+\]", "", self.key(name)))
        return original(self, name, default)

    monkeypatch.setattr(validate.Section, "raw", recording)
    parse_settings(tmp_path / "s.toml", {"tenants": {"file": "t.toml"},
                                         "limits": [{"window": "1m", "max": 1}]})
    return seen


def test_every_configuration_key_is_documented_with_a_default_the_parser_takes(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    rows = configuration_rows()
    parsed = keys_the_parser_reads(monkeypatch, tmp_path)
    monkeypatch.undo()
    missing = sorted(parsed - rows.keys())
    assert not missing, (f"docs/REFERENCE.md has no row for {missing}: add each to the "
                         "configuration table with its default and whether SIGHUP applies it")
    for key in sorted(parsed):
        default = rows[key][0]
        value = re.fullmatch(r"`(.*)`", default)
        if key.startswith("limits.") or value is None:
            continue  # a list of values, or a default in words
        section, name = key.split(".")
        data: dict[str, Any] = {"tenants": {"file": "t.toml"}}
        parsed_value = tomllib.loads(f"v = {value.group(1)}")["v"]
        data.setdefault(section, {})[name] = parsed_value
        try:
            parse_settings(tmp_path / "s.toml", data)
        except ConfigError as exc:
            pytest.fail(f"the documented default of {key} is refused: {exc}")


def test_the_keys_documented_as_needing_a_restart_are_the_ones_the_code_lists() -> None:
    rows = configuration_rows()
    documented = {key for key, (_, sighup) in rows.items() if "restart" in sighup}
    assert documented == set(RESTART_ONLY), (
        "docs/REFERENCE.md and cluster/reload.py RESTART_ONLY disagree on "
        f"{sorted(documented ^ set(RESTART_ONLY))}")
    assert all(rows[key][1].startswith(("applies", "restart")) for key in rows)


def test_every_reply_is_in_the_reference() -> None:
    from worker import replies

    code = "".join(p.read_text() for p in (ROOT / "worker").rglob("*.py")
                   if p.name != "replies.py")
    texts = {name: value for name, value in vars(replies).items()
             if name.isupper() and isinstance(value, str) and f"replies.{name}" in code}
    assert len(texts) > 15
    for name, text in texts.items():
        if name == "BANNER_IDENT":
            text = "220 {hostname} " + text
        assert f"`{text}" in REFERENCE, f"{name} ({text}) is not in docs/REFERENCE.md"


def commands(parser: argparse.ArgumentParser, prefix: str = "sendguard") -> list[str]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                below = commands(sub, f"{prefix} {name}")
                found += below or [f"{prefix} {name}"]
    return found


def test_every_command_is_in_the_reference() -> None:
    listed = REFERENCE.split("## 4. Commands", 1)[1]
    for command in commands(build_parser()):
        if command.startswith("sendguard loadtest"):
            command = "sendguard loadtest"
        assert f"`{command}" in listed, f"{command} is not in docs/REFERENCE.md"


def repository_files() -> set[str]:
    done = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    return set(done.stdout.split())


@pytest.mark.parametrize("document", ["README.md", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_documents_name_no_file_the_repository_lacks(document: str) -> None:
    files = repository_files()
    folders = {str(Path(f).parent) + "/" for f in files} | {
        "/".join(f.split("/")[:i]) + "/" for f in files for i in range(1, f.count("/") + 1)}
    text = (ROOT / document).read_text()
    for name in set(re.findall(r"(?<![\w/.$-])((?:[\w.-]+/)*[\w-]+\.(?:md|py|toml|sh|mmdb|csv|png)"
                               r"|(?:examples|docs|tests|loadtest|cluster|worker|coordinator)"
                               r"/(?:[\w.-]+/?)*)", text)):
        if name.startswith(MADE_AT_RUN_TIME) or name in ("sendguard.toml", "tenants.toml",
                                                         "accounts.csv"):
            continue  # an operator's own files, or the demo's
        relative = [name, f"docs/{name}", f"examples/{name}"]
        named = any(r in files or r in folders or f"{r}/" in folders or r.rstrip("/") in files
                    for r in relative)
        # A bare file name in a sentence about its folder (`bench-summary.csv`).
        named = named or ("/" not in name and any(f.endswith(f"/{name}") for f in files))
        assert named, (
            f"{document} names {name}, which the repository does not have")
    # The product contract is not shipped: the reference is docs/REFERENCE.md.
    assert not re.search(r"\bSPEC\b", text), f"{document} cites SPEC, which is not here"
