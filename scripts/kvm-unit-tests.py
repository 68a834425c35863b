#!/usr/bin/env python3
"""Runs the x86 tests of a kvm-unit-tests tree you built yourself under dvmm, on 1 node
and across nodes, and prints a table (docs/CONFORMANCE.md has the last one).

    scripts/kvm-unit-tests.py KUT_DIR [--dvmm target/release/dvmm] [--only a,b] [--nodes 1,2]

KUT_DIR is a kvm-unit-tests checkout where `./configure && make` has run (outside this
repository: nothing of the suite is kept here). Each entry of x86/unittests.cfg runs as
QEMU's runner would run it (its `smp`, `test_args` and `-m` of `qemu_params`), with
dvmm's `--test-devices`; exit status 1 is PASS, 77 SKIP, anything else FAIL. Across
nodes, a test with smp = N runs on min(N, 2) nodes (2 vCPUs: one per node; 4: 2+2);
a one-vCPU test has no cross-node run. `-cpu` models are not dvmm's to choose (the
guest always sees the host's features less what dvmm hides): they are listed in the
table's notes.
"""

import argparse
import configparser
import os
import re
import shlex
import subprocess
import sys
import time


def entries(cfg_path):
    text = open(cfg_path).read()
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.read_string(text)
    for name in parser.sections():
        yield name, dict(parser[name])


def memory_of(params):
    m = re.search(r"-m\s+(\d+)([MG]?)", params or "")
    if not m:
        return "256M"
    return m.group(1) + (m.group(2) or "M")


def run_one(dvmm, flat, cpus, nodes, memory, args, timeout):
    cmd = [dvmm, "run", "--test-devices", "--kernel", flat, "--cpus", str(cpus),
           "--memory", memory, "--nodes", str(nodes), "--cmdline", args]
    start = time.monotonic()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc = None
    took = time.monotonic() - start
    summary = ""
    for line in out.splitlines():
        if line.startswith("SUMMARY:"):
            summary = line.strip()
    if rc == 1:
        verdict = "PASS"
    elif rc == 77:
        verdict = "SKIP"
    elif rc is None:
        verdict = f"FAIL (timeout {timeout} s)"
    else:
        verdict = f"FAIL (exit {rc})"
    fails = [l.strip() for l in out.splitlines() if l.startswith("FAIL")]
    return verdict, summary, took, out, fails


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("kut")
    ap.add_argument("--dvmm", default="target/release/dvmm")
    ap.add_argument("--only", default="")
    ap.add_argument("--nodes", default="1,2")
    ap.add_argument("--logs", default="")
    ap.add_argument("--timeout-scale", type=float, default=3.0)
    a = ap.parse_args()
    only = set(filter(None, a.only.split(",")))
    modes = [int(n) for n in a.nodes.split(",")]
    print("| test | smp | 1 node | across nodes | notes |")
    print("| --- | --- | --- | --- | --- |")
    for name, e in entries(os.path.join(a.kut, "x86", "unittests.cfg")):
        if only and name not in only:
            continue
        if e.get("arch", "x86_64") != "x86_64":
            continue
        groups = e.get("groups", "").split()
        if "nodefault" in groups:
            continue
        flat = os.path.join(a.kut, "x86", e["file"])
        if not os.path.exists(flat):
            print(f"| {name} | - | not built | not built | |")
            continue
        smp = int(e.get("smp", "1").split()[0].replace("$MAX_SMP", "2") or 1)
        args = " ".join(shlex.split(e.get("test_args", "")))
        params = e.get("qemu_params", "") + " " + e.get("extra_params", "")
        timeout = int(float(re.sub(r"[^0-9.]", "", e.get("timeout", "90")) or 90) * a.timeout_scale)
        notes = []
        cpu = re.search(r"-cpu\s+(\S+)", params)
        if cpu:
            notes.append(f"wants -cpu {cpu.group(1)}")
        cells = {}
        for nodes in modes:
            n = 1 if nodes == 1 else min(smp, nodes)
            if nodes > 1 and n < 2:
                cells[nodes] = "-"
                continue
            verdict, summary, took, out, fails = run_one(
                a.dvmm, flat, smp, n, memory_of(params), args, timeout)
            cell = f"{verdict}, {took:.0f} s"
            if summary:
                cell += f" ({summary.removeprefix('SUMMARY: ')})"
            if fails:
                cell += "; " + "; ".join(f[:80] for f in fails[:3])
            cells[nodes] = cell.replace("|", "/")
            if a.logs:
                os.makedirs(a.logs, exist_ok=True)
                with open(os.path.join(a.logs, f"{name}.{nodes}.log"), "w") as f:
                    f.write(out)
        across = next((cells[m] for m in modes if m > 1), "-")
        print(f"| {name} | {smp} | {cells.get(1, '-')} | {across} | {'; '.join(notes)} |",
              flush=True)


if __name__ == "__main__":
    sys.exit(main())
