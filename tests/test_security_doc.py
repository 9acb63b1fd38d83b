"""docs/security.md shows the etcdctl commands the TLS/auth tests run, word for word."""

from __future__ import annotations

from pathlib import Path

from etcdroles import GROUP_ROLE_COMMANDS, PASSWORDS, ROLE_COMMANDS, fill

from locksmith.keys import DEFAULT_PREFIX

DOC = Path(__file__).resolve().parent.parent / "docs" / "security.md"


def test_the_documented_commands_are_the_tested_ones() -> None:
    text = DOC.read_text()
    shell_vars = {user: f"${user.upper()}_PASSWORD" for user in PASSWORDS}
    for args in (*ROLE_COMMANDS, *GROUP_ROLE_COMMANDS):
        line = "etcdctl " + " ".join(fill(args, DEFAULT_PREFIX, shell_vars))
        assert line in text, line
    assert "etcdctl auth enable" in text and "etcdctl user add root" in text
