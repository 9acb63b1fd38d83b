"""The eight parser defects of issue 11, one test each (each failed on the code before the fix).

1. a policy file that is a symlink to /dev/zero, or a FIFO (hang, gigabytes);
2. TOML nested ~500 deep (RecursionError, a 3,000-line traceback);
3. integers beyond any sane slot count (10^29, 2^63);
4. 10,000 windows (and `status` at the cap);
5. non-ASCII digits in times and durations;
6. a UTF-8 byte-order mark;
7. time_zone = "localtime" under a POSIX TZ string in `status`;
8. current_window_end of a span ending exactly at the 35-day horizon.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from locksmith.cli import main
from locksmith.etcd import EtcdConfig
from locksmith.policy import PolicyError, parse_policy_file, parse_policy_text, policy_from_json
from locksmith.windows import (
    NEVER_CLOSES,
    OPEN_HORIZON,
    DurationError,
    WindowError,
    parse_duration,
    parse_windows,
)

LOCKSMITHCTL = str(Path(sys.executable).with_name("locksmithctl"))
HEAD = 'format_version = 1\ngroup = "web"\n'


def _limited() -> None:
    # The old code read /dev/zero until memory ran out: keep that from hurting the machine.
    resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))


def ctl_validate(path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOCKSMITHCTL_")}
    return subprocess.run([LOCKSMITHCTL, "policy", "validate", str(path)], capture_output=True, text=True,
                          timeout=20, env=env, preexec_fn=_limited)


def run(cfg: EtcdConfig, prefix: str, *args: str) -> Result:
    return CliRunner().invoke(main, ["--endpoint", cfg.endpoints[0], "--prefix", prefix, *args],
                              catch_exceptions=False)


# -- 1 ---------------------------------------------------------------------------------------------


def test_1_policy_symlink_to_dev_zero_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "p.toml"
    p.symlink_to("/dev/zero")
    r = ctl_validate(p)
    assert r.returncode == 1, r.stderr[-500:]
    assert "Traceback" not in r.stderr
    assert f"{p}: cannot read: policy file is not a regular file (a character device)" in r.stderr


def test_1_policy_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    p = tmp_path / "p.toml"
    os.mkfifo(p)
    r = ctl_validate(p)
    assert r.returncode == 1
    assert "policy file is not a regular file (a FIFO)" in r.stderr and "Traceback" not in r.stderr


def test_1_oversized_policy_file_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "p.toml"
    p.write_text(HEAD + "# " + "x" * (1 << 20) + "\n")
    with pytest.raises(PolicyError, match=r"policy file is too large \(\d+ bytes; the limit is 1048576\)"):
        parse_policy_file(p)


# -- 2 ---------------------------------------------------------------------------------------------


def test_2_deeply_nested_toml_is_one_line(tmp_path: Path) -> None:
    p = tmp_path / "deep.toml"
    p.write_text(HEAD + "x = " + "[" * 500 + "]" * 500 + "\n")
    r = ctl_validate(p)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 2, r.stderr[-2000:]
    assert "nested too deeply" in r.stderr


def test_2_deeply_nested_stored_policy_is_corrupt_not_recursion() -> None:
    doc = {"format_version": 1, "windows": json.loads("[" * 200 + "]" * 200)}
    with pytest.raises(PolicyError, match="nested more than 16 levels deep"):
        policy_from_json(json.dumps(doc), key="k/policy")


# -- 3 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["100000000000000000000000000000", "9223372036854775808", "10001"])
def test_3_slots_has_an_upper_bound(value: str) -> None:
    with pytest.raises(PolicyError, match=f"slots: must be at most 10000, got {value}"):
        parse_policy_text(HEAD + f"slots = {value}\n")


def test_3_failure_budget_has_an_upper_bound() -> None:
    with pytest.raises(PolicyError, match="failure_budget: must be at most 10000, got 18446744073709551616"):
        parse_policy_text(HEAD + "failure_budget = 18446744073709551616\n")
    assert parse_policy_text(HEAD + "slots = 10000\nfailure_budget = 10000\n").slots == 10000


def test_3_set_max_has_the_same_bound(etcd_config: EtcdConfig, prefix: str) -> None:
    r = run(etcd_config, prefix, "set-max", "100000000000000000000000000000")
    assert r.exit_code == 2 and "100000000000000000000000000000 is not in the range 1<=x<=10000" in r.stderr
    assert run(etcd_config, prefix, "set-max", "10000").exit_code == 0


def test_3_integer_of_thousands_of_digits() -> None:
    with pytest.raises(PolicyError, match="Exceeds the limit"):
        parse_policy_text(HEAD + "slots = " + "9" * 5000 + "\n")
    with pytest.raises(PolicyError, match="not JSON: Exceeds the limit"):
        policy_from_json('{"format_version": 1, "slots": ' + "9" * 5000 + "}", key="k")


# -- 4 ---------------------------------------------------------------------------------------------


def _windows_toml(n: int) -> str:
    return HEAD + "".join(
        f'[[windows]]\nstart = "{(i // 60) % 24:02d}:{i % 60:02d}"\nlength = "{i % 167 + 1}h"\n' for i in range(n)
    )


def test_4_window_count_is_capped() -> None:
    with pytest.raises(PolicyError, match="windows: has 10000 entries; at most 100 are allowed"):
        parse_policy_text(_windows_toml(10000))
    with pytest.raises(PolicyError, match="windows: has 101 entries"):
        parse_policy_text(_windows_toml(101))
    with pytest.raises(WindowError, match="10000 windows; at most 100 are allowed"):
        parse_windows([{"start": "04:00", "length": "1h"}] * 10000)


def test_4_window_starts_a_week_are_capped() -> None:
    # 100 entries, but each cron expands to 48 windows: 33,600 starts a week.
    text = HEAD + "".join(
        f'[[windows]]\ncron = "{i % 30},{i % 30 + 30} * * * *"\nlength = "{i % 160 + 1}h"\n' for i in range(100)
    )
    with pytest.raises(PolicyError, match=r"windows: the windows start 33600 times a week \(at most 1000\)"):
        parse_policy_text(text)


def test_4_status_works_at_the_cap(etcd_config: EtcdConfig, prefix: str, tmp_path: Path) -> None:
    p = tmp_path / "cap.toml"
    p.write_text(_windows_toml(100))
    assert run(etcd_config, prefix, "policy", "apply", str(p)).exit_code == 0
    r = run(etcd_config, prefix, "--group", "web", "status")
    assert r.exit_code == 0, r.stderr
    assert "Window: open until" in r.stdout


# -- 5 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("start", ["０４:００", "٠٤:٠٠", "04:٠٠", "Thu ０４:00"])
def test_5_start_accepts_ascii_digits_only(start: str) -> None:
    with pytest.raises(PolicyError, match="invalid start time"):
        parse_policy_text(HEAD + f'[[windows]]\nstart = "{start}"\nlength = "1h"\n')


@pytest.mark.parametrize("length", ["١h", "１h", "1.５h", "²h"])
def test_5_duration_accepts_ascii_digits_only(length: str) -> None:
    with pytest.raises(DurationError, match="invalid duration"):
        parse_duration(length)
    with pytest.raises(PolicyError, match="invalid duration"):
        parse_policy_text(HEAD + f'[[windows]]\nstart = "04:00"\nlength = "{length}"\n')


@pytest.mark.parametrize("cron", ["٠ 4 * * *", "0 4 * * ١", "*/٥ 4 * * *", "0 ² * * *"])
def test_5_cron_accepts_ascii_digits_only(cron: str) -> None:
    with pytest.raises(WindowError, match="field"):
        parse_windows([{"cron": cron, "length": "1h"}])


# -- 6 ---------------------------------------------------------------------------------------------


def test_6_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    p = tmp_path / "bom.toml"
    p.write_bytes(b"\xef\xbb\xbf" + (HEAD + "slots = 3\n").encode())
    assert parse_policy_file(p).slots == 3
    assert parse_policy_text("\ufeff" + HEAD + "slots = 2\n").slots == 2
    r = ctl_validate(p)
    assert r.returncode == 0, r.stderr


# -- 7 ---------------------------------------------------------------------------------------------

LOCALTIME = HEAD + 'time_zone = "localtime"\n[[windows]]\ndays = ["daily"]\nstart = "00:00"\nlength = "168h"\n'


def test_7_status_under_a_posix_tz_string(etcd_config: EtcdConfig, prefix: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "local.toml"
    p.write_text(LOCALTIME)
    assert run(etcd_config, prefix, "policy", "apply", str(p)).exit_code == 0
    monkeypatch.setenv("TZ", "CET-1CEST,M3.5.0,M10.5.0/3")
    r = run(etcd_config, prefix, "--group", "web", "status")
    assert r.exit_code == 0, r.stderr
    assert "Window: open" in r.stdout


def test_7_status_with_an_unusable_tz_names_it_on_the_window_line(
    etcd_config: EtcdConfig, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = tmp_path / "local.toml"
    p.write_text(LOCALTIME)
    assert run(etcd_config, prefix, "policy", "apply", str(p)).exit_code == 0
    monkeypatch.setenv("TZ", "Nowhere/Atlantis")
    r = run(etcd_config, prefix, "--group", "web", "status")
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "Available: 1" in lines and "Max: 1" in lines
    assert ("Window: unknown (time_zone: localtime: TZ='Nowhere/Atlantis' is neither a known time zone "
            "nor a POSIX TZ string)") in lines


def test_7_posix_tz_string_matches_the_named_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "CET-1CEST,M3.5.0,M10.5.0/3")
    raw = [{"start": "02:30", "length": "1h"}]
    posix, named = parse_windows(raw, "localtime"), parse_windows(raw, "Europe/Berlin")
    t = datetime(2027, 1, 1, tzinfo=UTC)
    while t < datetime(2028, 1, 1, tzinfo=UTC):
        assert posix.next_open(t) == named.next_open(t), t
        assert posix.is_open(t) == named.is_open(t), t
        t += timedelta(hours=7, minutes=13)


# -- 8 ---------------------------------------------------------------------------------------------


def test_8_span_ending_exactly_at_the_horizon_closes_there() -> None:
    ws = parse_windows([{"cron": "0 0 * 1 *", "length": "168h"}], "UTC")
    t = datetime(2027, 1, 3, tzinfo=UTC)
    assert t + OPEN_HORIZON == datetime(2027, 2, 7, tzinfo=UTC)
    assert ws.current_window_end(t) == datetime(2027, 2, 7, tzinfo=UTC)
    assert ws.remaining(t) == OPEN_HORIZON
    # Asked a minute later the end is inside the horizon; a minute earlier it lies beyond it.
    assert ws.current_window_end(t + timedelta(minutes=1)) == datetime(2027, 2, 7, tzinfo=UTC)
    assert ws.current_window_end(datetime(2027, 1, 2, 23, 59, tzinfo=UTC)) == NEVER_CLOSES
