#!/usr/bin/env python3
"""Keep the policy schema's two derived files in step with it.

The schema lives in the package (locksmith/policy_schema.json, loaded with importlib.resources).
From it this script writes:

* policies/schema.json: a byte-identical copy, next to the example policies, for editors and
  other tools that validate policy files;
* the key reference of docs/policy.md: the text between the GENERATED markers (the rest of the
  document is written by hand).

    python scripts/gen_policy_doc.py           # rewrite both
    python scripts/gen_policy_doc.py --check   # exit 1 and name the stale files (tests run this)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "locksmith" / "policy_schema.json"
SCHEMA_COPY = ROOT / "policies" / "schema.json"
DOC = ROOT / "docs" / "policy.md"
BEGIN = "<!-- BEGIN GENERATED REFERENCE: scripts/gen_policy_doc.py renders this from the schema -->"
END = "<!-- END GENERATED REFERENCE -->"

_TYPE_WORDS = {"string": "string", "integer": "integer", "boolean": "boolean", "array": "list", "object": "table"}


def render_type(spec: dict[str, Any]) -> str:
    """The Type column for one schema property."""
    kind = spec.get("x-locksmith-kind")
    if kind == "duration":
        return "duration (string)"
    if kind == "time-zone":
        return "time zone (string)"
    types = spec["type"] if isinstance(spec["type"], list) else [spec["type"]]
    words = []
    for t in types:
        word = _TYPE_WORDS[t]
        if t == "array" and "items" in spec and spec["items"].get("type") == "string":
            word = "list of strings"
        elif t == "array" and "items" in spec:
            word = "list of tables"
        words.append(word)
    text = " or ".join(words)
    if "const" in spec:
        text += f", always `{json.dumps(spec['const'])}`"
    if "enum" in spec:
        text += ": " + ", ".join(f"`{v}`" for v in spec["enum"])
    if "minimum" in spec:
        text += f" ≥ {spec['minimum']}"
    if "maximum" in spec:
        text += f", ≤ {spec['maximum']}"
    if "minItems" in spec:
        text += f", at least {spec['minItems']} item{'s' if spec['minItems'] != 1 else ''}"
    if "maxItems" in spec:
        text += f", at most {spec['maxItems']} items"
    return text


def render_default(name: str, spec: dict[str, Any], required: list[str]) -> str:
    """The Default column: the TOML value a missing key means, 'required', or '(none)'."""
    if name in required:
        return "required"
    if "default" not in spec:
        return "(none)"
    return f"`{_toml_value(spec['default'])}`"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)


def _rows(properties: dict[str, Any], required: list[str], prefix: str = "") -> list[str]:
    rows = []
    for name, spec in properties.items():
        cells = [
            f"`{prefix}{name}`",
            render_type(spec),
            render_default(name, spec, required),
            spec.get("description", "").replace("|", "\\|"),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def render_reference(schema: dict[str, Any]) -> str:
    """The generated block, markers included."""
    header = ["| Key | Type | Default | Meaning |", "|---|---|---|---|"]
    items = schema["properties"]["windows"]["items"]
    lines = [
        BEGIN,
        "",
        "### Top-level keys",
        "",
        *header,
        *_rows(schema["properties"], schema.get("required", [])),
        "",
        "### Keys of a window (`[[windows]]`)",
        "",
        *header,
        *_rows(items["properties"], items.get("required", []), prefix="windows[]."),
        "",
        END,
    ]
    return "\n".join(lines)


def expected_files() -> dict[Path, str]:
    """What the derived files must contain, from the schema and the hand-written doc."""
    schema_text = SCHEMA.read_text(encoding="utf-8")
    schema = json.loads(schema_text)
    doc = DOC.read_text(encoding="utf-8")
    if doc.count(BEGIN) != 1 or doc.count(END) != 1:
        raise SystemExit(f"{DOC}: needs exactly one {BEGIN!r} and one {END!r} line")
    before, rest = doc.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    return {SCHEMA_COPY: schema_text, DOC: before + render_reference(schema) + after}


def stale_files() -> list[Path]:
    out = []
    for path, text in expected_files().items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            out.append(path)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for path in stale:
            print(f"{path.relative_to(ROOT)} is out of date: run python scripts/gen_policy_doc.py", file=sys.stderr)
        return 1 if stale else 0
    for path, text in expected_files().items():
        path.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
