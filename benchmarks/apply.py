"""Benchmark the agent's apply pipeline against the native shell pipeline, and its peak memory.

1. Throughput: one zstd payload (default 512 MiB uncompressed) is published with build_release and
   served by tests/httpserver.py in a separate process on 127.0.0.1. The agent (a child process:
   fetch + verify + install into a byte range of a file, fsync) is timed against
       zstd -dc PAYLOAD | tee >(HASH) | dd of=SLOT conv=notrunc,fsync
   with HASH = ``openssl dgst -sha256`` (the fair baseline: the same OpenSSL SHA-256 the agent's
   hashlib uses) and HASH = coreutils ``sha256sum`` (whose hashing is slower than the disk and zstd
   here, so the ratio against it flatters the agent). Both read the payload FROM THE FILE (no
   HTTP: a stricter baseline than the agent gets); when curl is installed, the openssl pipeline
   also runs fed by ``curl URL`` (like for like). Each variant runs once to warm up, then
   ``--runs`` times alternating; medians are compared. Target: agent <= 1.0x openssl (file).
2. Peak RSS (VmHWM of the child that applies, which includes the interpreter and its imports) for
   payloads of ``--rss-sizes`` MiB (default 256 and 1024), and what the imports cost: VmHWM of a
   bare interpreter, and after importing what an apply needs.

    .venv/bin/python benchmarks/apply.py                          # full size (several minutes)
    .venv/bin/python benchmarks/apply.py --size-mib 64 --rss-sizes 32,128 --runs 1   # quick
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MiB = 1 << 20
SLOT_OFFSET = 1 * MiB  # the slot sits inside a larger file, as on a disk


def _make_image(path: Path, size: int, seed: int = 1) -> None:
    """Compressible but not trivial: 4 KiB blocks from a 4 MiB pool of random data, 1/4 zeros."""
    rnd = random.Random(seed)
    pool = [rnd.randbytes(4096) for _ in range(1024)] + [bytes(4096)] * 341
    with path.open("wb") as f:
        left = size
        while left > 0:
            buf = b"".join(rnd.choices(pool, k=256))[:left]  # 1 MiB at a time
            f.write(buf)
            left -= len(buf)


def _publish(work: Path, size_mib: int, version: str) -> tuple[Path, Path, Path]:
    """Build a channel under work/www/<name>; return (channel dir, key dir, image)."""
    from updateagent.release import build_release, keygen

    keys = work / "keys"
    if not (keys / "release.key").exists():
        keygen(keys)
    img = work / f"image-{size_mib}.img"
    _make_image(img, size_mib * MiB)
    chan = work / "www" / f"ch{size_mib}"
    build_release(img, chan, version, keys / "release.key", compression="zstd")
    return chan, keys, img


def _target(path: Path, size: int) -> None:
    with path.open("wb") as f:
        f.truncate(SLOT_OFFSET + size + MiB)


def _child(url: str, keydir: str, target: str, size: int) -> None:
    """Apply in this (fresh) process; print elapsed seconds and peak RSS as JSON."""
    from locksmith.log import configure
    from updateagent.channel import fetch
    from updateagent.install import InstallTarget, install
    from updateagent.signature import KeySet

    configure("WARNING")
    base = _vmhwm()
    t0 = time.perf_counter()
    rel = fetch(url, KeySet.from_paths([keydir]))
    res = install(rel.manifest, rel.manifest_url, InstallTarget(target, SLOT_OFFSET, size))
    elapsed = time.perf_counter() - t0
    print(json.dumps({"elapsed": elapsed, "vmhwm_kib": _vmhwm(), "baseline_kib": base, "sha256": res.sha256}))


def _vmhwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


_APPLY_IMPORTS = ("from locksmith.log import configure; from updateagent.channel import fetch; "
                  "from updateagent.install import InstallTarget, install; from updateagent.signature import KeySet")


def _run_imports(statement: str) -> dict[str, float]:
    """VmHWM (KiB) of a fresh interpreter after ``statement``, and how long the statement took."""
    code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); t = time.perf_counter(); {statement or 'pass'}; "
            "t = time.perf_counter() - t; "
            "hwm = [int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]; "
            "print(hwm, t)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    return {"vmhwm_kib": float(out[0]), "seconds": float(out[1])}


def _run_agent(url: str, keydir: Path, target: Path, size: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", url, str(keydir), str(target), str(size)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


HASHERS = {"sha256sum": "sha256sum", "openssl": "openssl dgst -sha256 -r"}


def _run_native(source: str, target: Path, shafile: Path, hasher: str = "openssl") -> float:
    script = (
        f"set -o pipefail; {source} | zstd -dc | tee >({HASHERS[hasher]} > {shafile}) "
        f"| dd of={target} bs=1M seek={SLOT_OFFSET} oflag=seek_bytes conv=notrunc,fsync status=none; wait"
    )
    t0 = time.perf_counter()
    subprocess.run(["bash", "-c", script], check=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=512, help="payload size for the throughput comparison")
    ap.add_argument("--rss-sizes", default="256,1024", help="comma-separated payload sizes (MiB) for peak RSS")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per variant (after one warm-up)")
    ap.add_argument("--workdir", default=None, help="where to put images and payloads (default: a tmp dir)")
    ap.add_argument("--child", nargs=4, metavar=("URL", "KEYDIR", "TARGET", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.child[2], int(args.child[3]))
        return 0

    from tests.httpserver import __file__ as server_py

    work = Path(tempfile.mkdtemp(prefix="apply-bench-", dir=args.workdir))
    server = None
    try:
        t0 = time.perf_counter()
        chan, keys, img = _publish(work, args.size_mib, "2.0.0")
        manifest = json.loads((chan / "manifest.json").read_text())
        payload = chan / manifest["payload"]
        print(f"payload: {args.size_mib} MiB image -> {payload.stat().st_size / MiB:.1f} MiB zstd "
              f"(built in {time.perf_counter() - t0:.1f}s)")
        server = subprocess.Popen([sys.executable, server_py, str(work / "www")], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None
        base = server.stdout.readline().strip()
        url = f"{base}/{chan.name}/manifest.json"
        payload_url = f"{base}/{chan.name}/{payload.name}"
        size = args.size_mib * MiB
        target = work / "disk.img"
        _target(target, size)
        shafile = work / "native.sha256"
        variants: dict[str, list[float]] = {"agent (HTTP)": [], "openssl (file)": [], "sha256sum (file)": []}
        have_curl = shutil.which("curl") is not None
        if have_curl:
            variants["openssl (curl)"] = []

        def once(name: str) -> float:
            if name == "agent (HTTP)":
                r = _run_agent(url, keys, target, size)
                assert r["sha256"] == manifest["sha256"]
                return float(r["elapsed"])
            hasher, feed = name.removesuffix(")").split(" (")
            src = f"cat {payload}" if feed == "file" else f"curl -sSf {payload_url}"
            t = _run_native(src, target, shafile, hasher)
            assert shafile.read_text().split()[0] == manifest["sha256"], f"{name} hashed differently"
            return t

        for name in variants:  # warm-up: page cache, allocated blocks in the target file
            once(name)
        for _ in range(args.runs):
            for name in variants:
                variants[name].append(once(name))
        med = {k: statistics.median(v) for k, v in variants.items()}
        print(f"\nthroughput, {args.size_mib} MiB image, median of {args.runs} (after a warm-up):")
        for k, v in med.items():
            print(f"  {k:17s} {v:7.3f} s  {args.size_mib / v:7.1f} MiB/s   runs: "
                  + ", ".join(f"{x:.3f}" for x in variants[k]))
        ratio = med["agent (HTTP)"] / med["openssl (file)"]
        print(f"  ratio agent / openssl(file)   = {ratio:.3f}  (target <= 1.0) {'OK' if ratio <= 1.0 else 'OVER'}")
        print(f"  ratio agent / sha256sum(file) = {med['agent (HTTP)'] / med['sha256sum (file)']:.3f}  "
              "(flattering: sha256sum hashes slower than OpenSSL)")
        if have_curl:
            print(f"  ratio agent / openssl(curl)   = {med['agent (HTTP)'] / med['openssl (curl)']:.3f}")
        best = {k: min(v) for k, v in variants.items()}
        print(f"  best of {args.runs} (less sensitive to other load on the machine): agent / openssl(file) = "
              f"{best['agent (HTTP)'] / best['openssl (file)']:.3f}")

        t_sha = time.perf_counter()
        subprocess.run(["sha256sum", str(img)], check=True, capture_output=True)
        t_sha = time.perf_counter() - t_sha
        print(f"  note: coreutils sha256sum alone hashes the image at {args.size_mib / t_sha:.0f} MiB/s here; "
              "it bounds the native pipeline (the agent's hashlib uses OpenSSL)")

        bare = _run_imports("")
        loaded = _run_imports(_APPLY_IMPORTS)
        print(f"\nimport cost (VmHWM): bare interpreter {bare['vmhwm_kib'] / 1024:.1f} MiB; after importing "
              f"what an apply needs {loaded['vmhwm_kib'] / 1024:.1f} MiB "
              f"(+{(loaded['vmhwm_kib'] - bare['vmhwm_kib']) / 1024:.1f} MiB, {loaded['seconds'] * 1000:.0f} ms)")
        print("\npeak RSS of an apply (child process VmHWM; baseline = after imports, before the apply):")
        img.unlink()
        for mib in (int(x) for x in args.rss_sizes.split(",") if x):
            if mib == args.size_mib:
                rchan = chan
            else:
                rchan, _, rimg = _publish(work, mib, "2.0.0")
                rimg.unlink()
            rtarget = work / f"disk-{mib}.img"
            _target(rtarget, mib * MiB)
            r = _run_agent(f"{base}/{rchan.name}/manifest.json", keys, rtarget, mib * MiB)
            print(f"  {mib:5d} MiB payload: peak {r['vmhwm_kib'] / 1024:6.1f} MiB "
                  f"(baseline {r['baseline_kib'] / 1024:.1f} MiB), apply {r['elapsed']:.2f}s")
            rtarget.unlink()
    finally:
        if server is not None:
            assert server.stdin is not None
            server.stdin.close()
            server.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
