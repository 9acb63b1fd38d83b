"""docs/policy.md and the schema cannot drift: the reference is generated from the schema, every
schema key is documented with its type and default, and the examples in the doc are real."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from locksmith.policy import PolicyError, load_schema, parse_policy_text, policy_from_json

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "policy.md"
ROW = re.compile(r"^\| `(?P<key>[^`]+)` \| (?P<type>[^|]+) \| (?P<default>[^|]+) \| (?P<meaning>.*) \|$")
FENCE = re.compile(r"^```(?P<lang>\w+)\n(?P<body>.*?)^```$", re.M | re.S)


def _load_script() -> ModuleType:
    path = ROOT / "scripts" / "gen_policy_doc.py"
    spec = importlib.util.spec_from_file_location("gen_policy_doc", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_policy_doc"] = module
    spec.loader.exec_module(module)
    return module


gen = _load_script()


def _schema_keys() -> dict[str, dict[str, Any]]:
    schema = load_schema()
    keys = dict(schema["properties"])
    for name, spec in schema["properties"]["windows"]["items"]["properties"].items():
        keys[f"windows[].{name}"] = spec
    return keys


def _documented_rows() -> dict[str, dict[str, str]]:
    text = DOC.read_text()
    section = text.split(gen.BEGIN, 1)[1].split(gen.END, 1)[0]
    rows: dict[str, dict[str, str]] = {}
    for line in section.splitlines():
        m = ROW.match(line)
        if m:
            assert m.group("key") not in rows, f"{m.group('key')} documented twice"
            rows[m.group("key")] = {k: v.strip() for k, v in m.groupdict().items()}
    return rows


def _blocks(lang: str) -> list[str]:
    return [m.group("body") for m in FENCE.finditer(DOC.read_text()) if m.group("lang") == lang]


def test_generated_files_are_up_to_date() -> None:
    stale = [str(p.relative_to(ROOT)) for p in gen.stale_files()]
    assert stale == [], "run: python scripts/gen_policy_doc.py"
    assert gen.main(["--check"]) == 0


def test_every_schema_key_is_documented_with_type_and_default() -> None:
    rows = _documented_rows()
    required = load_schema()["required"]
    for key, spec in _schema_keys().items():
        assert key in rows, f"{key} is not documented"
        row = rows[key]
        types = spec["type"] if isinstance(spec["type"], list) else [spec["type"]]
        words = {"string": "string", "integer": "integer", "boolean": "boolean", "array": "list"}
        assert any(words[t] in row["type"] for t in types), (key, row["type"])
        for value in spec.get("enum", []):
            assert f"`{value}`" in row["type"], (key, value)
        if "minimum" in spec:
            assert f"≥ {spec['minimum']}" in row["type"], key
        if key in required:
            assert row["default"] == "required", key
        elif "default" in spec:
            # The documented default, read as TOML, is the schema's default.
            assert tomllib.loads(f"v = {row['default'].strip('`')}")["v"] == spec["default"], key
        else:
            assert row["default"] == "(none)", key
        assert row["meaning"] == spec["description"].replace("|", "\\|"), key


def test_no_documented_key_is_missing_from_the_schema() -> None:
    schema_keys = set(_schema_keys())
    assert set(_documented_rows()) <= schema_keys
    # Keys used in the doc's TOML examples exist too (and the examples are complete policies).
    for body in _blocks("toml"):
        data = tomllib.loads(body)
        assert set(data) <= schema_keys
        for window in data.get("windows", []):
            assert {f"windows[].{k}" for k in window} <= schema_keys


def test_the_doc_examples_are_real() -> None:
    valid = [b for b in _blocks("toml") if not b.startswith("# bad.toml")]
    invalid = [b for b in _blocks("toml") if b.startswith("# bad.toml")]
    assert valid and len(invalid) == 1
    policies = [parse_policy_text(body) for body in valid]
    # The etcd-form example is the stored form of the first file example.
    (stored,) = _blocks("json")
    assert policy_from_json(json.loads(stored), key="doc") == policies[0]
    assert json.loads(stored) == policies[0].to_json()
    # The error example is what the checker says about the bad file.
    with pytest.raises(PolicyError) as err:
        parse_policy_text(invalid[0], source="bad.toml")
    shown = next(b for b in _blocks("text") if b.startswith("$ locksmithctl policy apply bad.toml"))
    assert shown.splitlines()[1:] == err.value.describe().splitlines()


def test_the_doc_lists_every_example_file() -> None:
    text = DOC.read_text()
    for path in sorted((ROOT / "policies").glob("*.toml")):
        assert f"`policies/{path.name}`" in text, path.name


def test_the_check_mode_notices_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = tmp_path / "policy.md"
    copy = tmp_path / "schema.json"
    doc.write_text(DOC.read_text().replace("| `slots` |", "| `slot` |"))
    copy.write_text((ROOT / "policies" / "schema.json").read_text())
    monkeypatch.setattr(gen, "DOC", doc)
    monkeypatch.setattr(gen, "SCHEMA_COPY", copy)
    assert gen.stale_files() == [doc]
    copy.write_text("{}")
    assert gen.stale_files() == [copy, doc]
    assert gen.main([]) == 0  # regenerate
    assert gen.stale_files() == []
    assert doc.read_text() == DOC.read_text()
