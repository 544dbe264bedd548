#!/usr/bin/env python
"""Crash safety at scale: SIGKILL ``lookalike index`` at many moments and inject real I/O
failures, then check after every rerun that nothing was lost or corrupted.

The harness is tests/fault_harness.py (tests/test_faults.py runs a CI-sized set). Each
trial changes the image folder (adds, deletes, edits, renames, copies, corrupt files), runs
``lookalike index`` with one fault, checks the committed state, reruns it cleanly and checks
that every good image on disk is in the database and in the FAISS file exactly once with the
descriptor of a fresh computation, and every bad file is recorded as failed.

Kill points are events counted inside the child (a SQLite COMMIT about to run or just
returned, a pipeline batch, a row's local features about to be written, the FAISS write,
halfway through it, each rename, the database close, the migration of a new database, the
ONNX export), the Nth occurrence drawn at random, plus SIGKILLs from outside at random
times over the measured length of a run. I/O failures are real: RLIMIT_FSIZE (EFBIG) on the
FAISS file, its sidecar, the WAL mid-run or a new database from the start; RLIMIT_NOFILE
(EMFILE) when the FAISS temp file is created, while hashing and while decoding.

After a trial that found a problem the next one starts on a fresh database, so one
failure is not counted again by the trials after it.

    python bench/reliability.py --kills 200 --io-failures 20 --seed 1
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
import random
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fault_harness import TABLE_HEAD, Harness, kill, limit, timed


def n_of(h: Harness, event: str, spare: int = 0) -> int:
    """A random occurrence of ``event``, among as many as a recent run met, leaving ``spare``
    after it (so that a limit applied there has writes left to fail)."""
    return h.rng.randint(1, max(1, h.event_max[event] - spare))


# Taken in turn, so that a few trials cover each.
ONNX_KILLS = itertools.cycle([kill("onnx-exported", how="midway"), kill("replace:onnx"),
                              kill("onnx-exported"), kill("replaced:onnx")])


# fault class -> (weight, make(harness) -> (faults, trial options))
KILLS = {
    "kill: before a SQLite COMMIT": (3, lambda h: ([kill("commit", n_of(h, "commit"))], {})),
    "kill: after a SQLite commit": (3, lambda h: ([kill("committed", n_of(h, "committed"))], {})),
    "kill: after scan or hashing": (1, lambda h: ([kill(h.rng.choice(["scanned", "hashed"]))], {})),
    "kill: pipeline batch (embedded, not stored)": (2, lambda h: ([kill("batch", n_of(h, "batch"))], {})),
    "kill: writing local features (mid-transaction)": (2, lambda h: ([kill("local", n_of(h, "local"))], {})),
    "kill: writing the FAISS file": (2, lambda h: ([h.rng.choice([
        kill("save"), kill("faiss-write", how="midway"), kill("faiss-written"),
        kill("replace:faiss")])], {})),
    "kill: between FAISS file, sidecar and exit": (1, lambda h: ([kill(h.rng.choice(
        ["replaced:faiss", "replace:meta", "replaced:meta"]))], {})),
    "kill: database close (WAL checkpoint)": (1, lambda h: ([kill("close")], {})),
    "kill: new database (migration commit, recipe, first run)": (1, lambda h: ([h.rng.choice([
        kill("committed", 1), kill("committed", 2), kill("batch", h.rng.randint(1, 6))])],
        {"fresh_db": True})),
    "kill: migration DDL of a new database": (0.4, lambda h: ([kill("ddl", h.rng.randint(1, 4))],
                                                             {"fresh_db": True})),
    "kill: ONNX export (empty model cache)": (0.5, lambda h: (
        [dict(next(ONNX_KILLS))], {"cache": "fresh"})),
    "kill: random time": (4, lambda h: ([timed()], {})),
    "kill: twice (the recovering run killed too)": (1, lambda h: ([timed(), timed()], {})),
}

IO = {
    "EFBIG: FAISS file": lambda h: ([limit("fsize", "save", value=h.rng.randint(0, 65536))], {}),
    "EFBIG: FAISS sidecar": lambda h: ([limit("fsize", "replaced:faiss")], {}),
    "EFBIG: WAL mid-run": lambda h: ([limit("fsize", "committed", n_of(h, "committed", 1),
                                            value=h.rng.randint(0, 4096), relative=True,
                                            expect_failure=False)], {}),
    "EFBIG: new database from the start": lambda h: ([limit(
        "fsize", "main", value=h.rng.randint(100_000, 300_000), expect_failure=False)],
        {"fresh_db": True}),
    "EMFILE: FAISS temp file": lambda h: ([limit("nofile", "save")], {}),
    "EMFILE: hashing": lambda h: ([dict(limit("nofile", "scanned"), spec={
        **limit("nofile", "scanned")["spec"], "preload": ["faiss"]})], {}),
    "EMFILE: decoding": lambda h: ([limit("nofile", "batch", 1,
                                          expect_failure=False)], {}),
}


def plan(kills: int, io: int, rng: random.Random) -> list[tuple[str, object]]:
    """Trials per class in proportion to the weights (each class at least once), shuffled."""
    total = sum(w for w, _ in KILLS.values())
    out = []
    counts = {c: max(1, round(kills * w / total)) for c, (w, _) in KILLS.items()}
    while sum(counts.values()) > kills:
        counts[max(counts, key=counts.get)] -= 1
    while sum(counts.values()) < kills:
        counts["kill: random time"] += 1
    for c, n in counts.items():
        out += [(c, KILLS[c][1])] * n
    classes = list(IO)
    out += [(classes[i % len(classes)], IO[classes[i % len(classes)]]) for i in range(io)]
    rng.shuffle(out)
    return out


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=200)
    ap.add_argument("--io-failures", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--images", type=int, default=24, help="files in the folder (2 of them corrupt)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="kept afterwards [default: a temp folder, removed]")
    ap.add_argument("--trials-out", type=Path, help="also write every trial's row here (markdown)")
    args = ap.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="lookalike-reliability-"))
    os.environ.setdefault("LOOKALIKE_CACHE", str(work / "cache"))
    started = time.monotonic()
    rng = random.Random(args.seed)
    h = Harness(work / "h", seed=args.seed, images=args.images, batch_size=args.batch_size,
                workers=args.workers)
    base = h.baseline()
    outcomes = [base]
    if not base.survived:
        print(f"baseline failed: {base.row()}", file=sys.stderr)
        return 1
    trials = plan(args.kills, args.io_failures, rng)
    for i, (cls, make) in enumerate(trials, 1):
        faults, options = make(h)
        for f in faults:  # a drawn occurrence may not come: that is 'not landed', not a failure
            f.pop("expect_kill", None)
        if options.get("cache") == "fresh":
            options["cache"] = work / "caches" / f"c{i}"
        out = h.trial(f"{i} {cls}", cls, faults, **options)
        outcomes.append(out)
        print(f"[{i}/{len(trials)} {time.monotonic() - started:6.0f}s] {out.row()}", flush=True)
        if not out.survived or out.rerun_rc != 0:
            h.fresh_db()  # do not let one failure be counted again by the next trials
    wall = time.monotonic() - started

    by = defaultdict(list)
    for out in outcomes[1:]:
        by[out.fault].append(out)
    lines = ["| fault class | trials | fault landed | survived | images lost | inconsistent trials |",
             "|---|---|---|---|---|---|"]
    tot = Counter()
    for cls in list(KILLS) + list(IO):
        outs = by.get(cls, [])
        if not outs:
            continue
        row = Counter(trials=len(outs), landed=sum(o.hit for o in outs),
                      survived=sum(o.survived for o in outs), lost=sum(o.lost for o in outs),
                      bad=sum(bool(o.issues) for o in outs))
        tot += row
        lines.append(f"| {cls} | {row['trials']} | {row['landed']} | {row['survived']} | "
                     f"{row['lost']} | {row['bad']} |")
    lines.append(f"| **all** | {tot['trials']} | {tot['landed']} | {tot['survived']} | "
                 f"{tot['lost']} | {tot['bad']} |")
    points = sorted({o.where.split(" ")[0] for o in outcomes if o.killed})
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, "bench/reliability.py", *(argv or sys.argv[1:])])
    print()
    print(f"Command: `{cmd}`  ")
    print(f"Machine: {machine()}  ")
    print(f"Wall time: {wall:.0f} s for {len(trials)} trials ({2 * len(trials) + 1}+ index runs)  ")
    print("'fault landed': the run was killed, or the injected I/O failure made it fail; "
          "'survived': no inconsistency and nothing lost after the rerun.")
    print()
    print("\n".join(lines))
    print()
    print(f"Distinct kill points that landed ({len(points)}): {', '.join(points)}")
    failed = [o for o in outcomes if not o.survived]
    if failed:
        print("\nTrials that did not survive:\n")
        print(TABLE_HEAD)
        for o in failed:
            print(o.row())
    if args.trials_out:
        args.trials_out.write_text(TABLE_HEAD + "\n" + "\n".join(o.row() for o in outcomes) + "\n")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not failed else 2


if __name__ == "__main__":
    sys.exit(main())
