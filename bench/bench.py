#!/usr/bin/env python
"""Benchmark lookalike on real camera photos of 10 megapixels or more.

What it measures, in one run:

  1. indexing: ``lookalike index`` as a subprocess on a fresh database, timed
     as a whole process (interpreter start, imports, model load, scan, hash,
     decode, embed, write). The ONNX export is a one-time step cached on disk;
     it is done once, untimed, before the timed runs;
  2. a second ``lookalike index`` on the same folder, nothing changed
     (incremental: it should embed nothing);
  3. the naive loop the product is judged against, as a whole process (its
     interpreter start, imports and model build counted): per image, a
     full-size PIL decode (no draft mode), EXIF orientation, a bicubic resize
     of the longest side to the recipe's image size, one eager torch forward
     of the same trunk and GeM pooling. It does less than lookalike, which
     also runs the half-size pass and finds local features;
  4. the same naive loop in-process doing all of lookalike's global work
     (one forward per scale), timed by stage, and a check that both give
     near-identical descriptors (cosine);
  5. where lookalike's time goes: decode alone, local features alone and model
     alone, in-process;
  6. query latency: p50/p95 with a warm in-process ``Searcher``, with
     verification (the default) and without (``verify=0``), interleaved in one
     run, and the wall time of a cold ``lookalike query IMG --db DB`` subprocess.

The photo set is built from camera photos shipped in Debian packages
(lomiri-wallpapers-16.04, mate-backgrounds), or from --source folders: every
JPEG of >= 10 MP, re-encoded as baseline JPEGs at a few qualities until there
are --count distinct files.

    python bench/bench.py                 # 100 images, about 1 minute on 2 cores
    python bench/bench.py --count 300 --workers 4 --device cuda --keep
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Camera photos (not renders) of 10 MP or more, shipped in Debian packages.
DEFAULT_SOURCES = [
    # lomiri-wallpapers-16.04
    "/usr/share/backgrounds/seeding_by_Clements_Engelhardt.jpg",
    "/usr/share/backgrounds/Dragonfly_by_Bolly.jpg",
    "/usr/share/backgrounds/sunset_by_Aitzol_Berasategi.jpg",
    "/usr/share/backgrounds/Bridge_by_Sander_Klootwijk.jpg",
    # mate-backgrounds (EXIF: SONY DSC-RX100M4)
    "/usr/share/backgrounds/mate/abstract/Elephants_5640x3172.jpg",
]
MIN_PIXELS = 10_000_000
SUMMARY_RE = re.compile(
    r"(\d+) added, (\d+) updated, (\d+) moved, (\d+) removed, (\d+) unchanged, (\d+) failed "
    r"\((\d+) embedded in ([\d.]+)s\)")


# -- helpers --------------------------------------------------------------------------------
def say(text: str = "") -> None:
    print(text, flush=True)


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def lookalike_command() -> list[str]:
    """The installed ``lookalike`` script next to this interpreter, else ``python -m cli``."""
    script = Path(sys.executable).with_name("lookalike")
    if script.exists():
        return [str(script)]
    found = shutil.which("lookalike")
    return [found] if found else [sys.executable, "-m", "cli"]


def run_timed(cmd: list[str], env: dict) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    return elapsed, proc


def parse_summary(stderr: str) -> dict:
    m = SUMMARY_RE.search(stderr)
    if not m:
        sys.exit(f"no summary line in lookalike's output:\n{stderr}")
    keys = ("added", "updated", "moved", "removed", "unchanged", "failed", "embedded")
    out = {k: int(v) for k, v in zip(keys, m.groups()[:7])}
    out["seconds"] = float(m.group(8))
    return out


# -- machine --------------------------------------------------------------------------------
def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def busy_warning() -> str:
    """A warning when other processes keep the CPUs busy (timings would be noisy)."""
    try:
        one = float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return ""
    if one > 0.5 * (os.cpu_count() or 1):
        return f"  WARNING: load average {one:.1f} on {os.cpu_count()} cores: other work is running"
    return ""


def cpu_seconds() -> tuple[float, float, float]:
    """(busy CPU seconds of the whole machine, of this process and its waited-for descendants, wall)."""
    import resource

    busy = float("nan")
    try:
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    except (OSError, ValueError, IndexError):
        pass
    ours = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        r = resource.getrusage(who)
        ours += r.ru_utime + r.ru_stime
    return busy, ours, time.perf_counter()


def others_line(start: tuple[float, float, float]) -> str:
    busy, ours, wall = (b - a for a, b in zip(start, cpu_seconds()))
    other = max(0.0, busy - ours)
    share = other / (wall * (os.cpu_count() or 1))
    line = (f"other processes used {other:.0f} CPU-seconds during the {wall:.0f}s run "
            f"({100 * share:.0f}% of the machine)")
    return line + ("  WARNING: timings are noisy" if share > 0.1 else "")


def machine() -> list[str]:
    import onnxruntime
    import PIL
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 ** 2:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    gpu = "none"
    if torch.cuda.is_available():
        gpu = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return [
        f"CPU       {cpu}, {os.cpu_count()} logical cores ({usable} usable){mem}",
        f"GPU       {gpu}",
        f"OS        {platform.platform()}",
        f"software  Python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}, Pillow {PIL.__version__}",
        f"load avg  {load_average()} (1, 5, 15 min) at start{busy_warning()}",
    ]


# -- photo set ------------------------------------------------------------------------------
def find_sources(folders: list[str] | None) -> list[Path]:
    from PIL import Image

    if folders:
        candidates = []
        for folder in folders:
            for root, _, names in os.walk(folder):
                candidates += [Path(root) / n for n in names
                               if n.lower().endswith((".jpg", ".jpeg"))]
    else:
        candidates = [Path(p) for p in DEFAULT_SOURCES if Path(p).exists()]
    found = []
    for p in sorted(candidates):
        try:
            with Image.open(p) as im:
                if im.format == "JPEG" and im.width * im.height >= MIN_PIXELS:
                    found.append(p)
        except OSError:
            continue
    return found


def build_photo_set(sources: list[Path], count: int, folder: Path) -> list[Path]:
    """``count`` distinct baseline JPEGs, each source re-encoded at qualities 95, 94, ... 60.

    Chroma subsampling alternates 4:2:0 / 4:2:2 (both common in cameras); past 36
    variants of one source, a few pixel columns are cropped off so files stay distinct.
    """
    from PIL import Image

    folder.mkdir(parents=True)
    per = -(-count // len(sources))
    out: list[Path] = []
    for si, src in enumerate(sources):
        with Image.open(src) as im:
            im.load()
            extra = {k: im.info[k] for k in ("exif", "icc_profile") if im.info.get(k)}
            for k in range(per):
                n = si + k * len(sources)  # interleave sources, so any prefix mixes them
                if n >= count:
                    break
                q, crop = 95 - k % 36, k // 36
                variant = im.crop((0, 0, im.width - crop, im.height)) if crop else im
                path = folder / f"{n:04d}_{src.stem[:24]}_q{q}{f'_c{crop}' if crop else ''}.jpg"
                variant.save(path, "JPEG", quality=q, subsampling=2 if k % 2 == 0 else 1, **extra)
                out.append(path)
    return sorted(out)


# -- naive baseline -------------------------------------------------------------------------
def naive_embed(paths: list[Path], recipe, device: str, keep_pixels: int = 5):
    """Per image: full PIL decode, bicubic resize, one eager torch forward per scale.

    The same work as the recipe asks of lookalike: every scale (each resized
    from the image at ``image_size``, as lookalike does), every stage pooled,
    stages concatenated, scales summed.

    Returns the loop's seconds, the model build seconds, seconds per stage, the
    vectors, and the resized pixels of the first ``keep_pixels`` images.
    """
    import torch
    from PIL import Image, ImageOps

    from indexer.backbone import resolve_weights
    from indexer.decode import target_size
    from indexer.network import build_trunk
    from indexer.pooling import l2n, pool

    t0 = time.perf_counter()
    weights, _ = resolve_weights(recipe.model)
    net = build_trunk(recipe.model, recipe.layer, weights).to(device)
    image_size = recipe.image_size
    build_s = time.perf_counter() - t0

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    # One untimed forward so that one-time setup does not land on the first image.
    with torch.inference_mode():
        net(torch.zeros(1, 3, 64, 64, device=device))
    sync()
    stages = {"decode": 0.0, "resize": 0.0, "forward": 0.0}
    vectors, kept = [], []
    start = time.perf_counter()
    with torch.inference_mode():
        for p in paths:
            a = time.perf_counter()
            im = Image.open(p)
            im.load()
            im = ImageOps.exif_transpose(im).convert("RGB")
            b = time.perf_counter()
            im = im.resize(target_size(im.width, im.height, image_size), Image.Resampling.BICUBIC)
            px = np.asarray(im, dtype=np.uint8)
            if len(kept) < keep_pixels:
                kept.append(px)
            views = [px if s == 1.0 else np.asarray(im.resize(
                (max(1, round(im.width * s)), max(1, round(im.height * s))),
                Image.Resampling.BICUBIC, reducing_gap=3.0)) for s in recipe.scales]
            c = time.perf_counter()
            total_vec = 0.0
            for view in views:
                x = torch.from_numpy(view.transpose(2, 0, 1).astype(np.float32))[None].to(device)
                out = net(x)
                fmaps = out if isinstance(out, tuple) else (out,)
                parts = [pool(f.float().cpu().numpy(), recipe.pooling, recipe.gem_p or 3.0) for f in fmaps]
                total_vec = total_vec + (parts[0] if len(parts) == 1 else l2n(np.concatenate(parts, axis=1)))
            vectors.append(l2n(total_vec)[0])
            sync()
            d = time.perf_counter()
            stages["decode"] += b - a
            stages["resize"] += c - b
            stages["forward"] += d - c
    total = time.perf_counter() - start
    return total, build_s, stages, np.stack(vectors), kept


def naive_process(folder: Path, image_size: int, env: dict) -> float:
    """Seconds for the naive loop as a whole process (``bench.py --naive-child``)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--naive-child", str(folder),
           "--image-size", str(image_size)]
    elapsed, proc = run_timed(cmd, env)
    return elapsed


def naive_child(folder: Path, image_size: int) -> None:
    """The naive loop: full decode, EXIF orientation, resize, one eager forward at image_size."""
    import torch
    from PIL import Image, ImageOps

    from indexer.backbone import DEFAULT_MODEL, resolve_weights
    from indexer.decode import target_size
    from indexer.network import build_trunk
    from indexer.pooling import pool

    weights, _ = resolve_weights(DEFAULT_MODEL)
    net = build_trunk(DEFAULT_MODEL, "head", weights)
    vectors = []
    with torch.inference_mode():
        for p in sorted(folder.iterdir()):
            im = Image.open(p)
            im.load()
            im = ImageOps.exif_transpose(im).convert("RGB")
            im = im.resize(target_size(im.width, im.height, image_size), Image.Resampling.BICUBIC)
            x = torch.from_numpy(np.asarray(im, dtype=np.float32).transpose(2, 0, 1).copy())[None]
            vectors.append(pool(net(x).numpy(), "gem", 3.0)[0])
    print(len(vectors))


# -- lookalike, piece by piece --------------------------------------------------------------
def breakdown(paths: list[Path], recipe, device: str, batch_size: int):
    """In-process, one thread of Python: lookalike's decode alone, its local features alone,
    then its model alone."""
    from indexer import local
    from indexer.decode import open_image
    from indexer.encoder import Encoder

    start = time.perf_counter()
    both = [open_image(p, recipe.image_size, gray=recipe.local_size or None) for p in paths]
    decoded = [d.pixels for d in both]
    decode_s = time.perf_counter() - start
    start = time.perf_counter()
    sizes = [len(local.encode(local.extract(d.gray, recipe.local_keypoints)))
             for d in both if d.gray is not None]
    local_s = time.perf_counter() - start
    encoder = Encoder(recipe, None, device)
    buckets: dict[tuple, list] = {}
    for px in decoded:
        buckets.setdefault(px.shape, []).append(px)
    batches = [b[i:i + batch_size] for b in buckets.values() for i in range(0, len(b), batch_size)]
    for b in buckets.values():  # warm-up: the first run of each shape
        encoder.embed(np.stack(b[:1]))
    start = time.perf_counter()
    for b in batches:
        encoder.embed(np.stack(b))
    model_s = time.perf_counter() - start
    return decode_s, local_s, sizes, model_s, encoder


def db_vectors(db: Path) -> dict[str, np.ndarray]:
    """The stored descriptors by path (float16 since issue 10), read through the store."""
    from indexer.store import Store

    store = Store(db, create=False)
    try:
        paths = [p for p, in store_paths(db)]
        return store.embeddings_at(paths)
    finally:
        store.close()


def store_paths(db: Path) -> list[tuple[str]]:
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT path FROM images WHERE status = 'ok'").fetchall()
    finally:
        con.close()


# -- main -----------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=100, help="images to index [100]")
    ap.add_argument("--workers", type=int, help="decoding processes [lookalike's default]")
    ap.add_argument("--batch-size", type=int, default=32, help="model batch size [32]")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="[auto]")
    ap.add_argument("--naive-count", type=int,
                    help="images for the naive baseline [all; images/s is the figure]")
    ap.add_argument("--index-repeats", type=int, default=3,
                    help="timed `lookalike index` runs, each with a fresh db; the median counts [3]")
    ap.add_argument("--queries", type=int, default=100, help="warm in-process queries [100]")
    ap.add_argument("--cold-repeats", type=int, default=5, help="cold CLI queries [5]")
    ap.add_argument("--source", action="append",
                    help="folder of camera JPEGs to use instead of the Debian wallpapers (repeatable)")
    ap.add_argument("--work", help="work folder [a new one under the temp dir]")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (photos, databases)")
    ap.add_argument("--naive-child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--image-size", type=int, default=448, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.naive_child:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        naive_child(args.naive_child, args.image_size)
        return
    if args.count < 1 or args.index_repeats < 1:
        ap.error("--count and --index-repeats must be at least 1")

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from indexer.encoder import cache_dir, resolve_device
    from indexer.sync import default_workers

    started = cpu_seconds()
    device = resolve_device(args.device)
    workers = default_workers() if args.workers is None else args.workers
    say("== machine")
    for line in machine():
        say(line)

    # -- photo set
    sources = find_sources(args.source)
    if not sources:
        sys.exit("no camera JPEG of 10 MP or more found; pass --source FOLDER")
    if args.work:
        work = Path(args.work).expanduser().resolve()
        work.mkdir(parents=True, exist_ok=True)
        for name in ("photos", "warm", "index-", "warm.db"):
            target = work / name
            if target.is_dir():
                shutil.rmtree(target)
            for f in work.glob(name + "*"):
                if f.is_file():
                    f.unlink()
    else:
        work = Path(tempfile.mkdtemp(prefix="lookalike-bench-"))
    from PIL import Image

    say("\n== photo set")
    say(f"{len(sources)} source photos >= {MIN_PIXELS / 1e6:.0f} MP:")
    for s in sources:
        with Image.open(s) as im:
            say(f"  {im.width}x{im.height} = {im.width * im.height / 1e6:4.1f} MP  "
                f"{s.stat().st_size / 1e6:5.1f} MB  {s}")
    t = time.perf_counter()
    photos = build_photo_set(sources, args.count, work / "photos")
    mp = []
    for p in photos:
        with Image.open(p) as im:
            mp.append(im.width * im.height / 1e6)
    size_mb = sum(p.stat().st_size for p in photos) / 1e6
    say(f"built {len(photos)} distinct baseline JPEGs (quality 95 down, 4:2:0/4:2:2) in "
        f"{work / 'photos'}: {min(mp):.1f}-{max(mp):.1f} MP, mean {statistics.mean(mp):.1f} MP, "
        f"{size_mb:.0f} MB in all ({time.perf_counter() - t:.0f}s to build)")

    env = dict(os.environ)
    env.pop("LOOKALIKE_DB", None)
    cli = lookalike_command()
    opts = ["--batch-size", str(args.batch_size), "--device", args.device, "--workers", str(workers)]

    # -- warm-up: one-time ONNX export into the cache, page cache for Python's modules
    (work / "warm").mkdir()
    shutil.copy(photos[0], work / "warm" / photos[0].name)
    t, _ = run_timed(cli + ["index", str(work / "warm"), "--db", str(work / "warm.db")] + opts, env)
    say(f"\nwarm-up (untimed): one `lookalike index` of 1 image, {t:.1f}s; ONNX cache is "
        f"{os.environ.get('LOOKALIKE_CACHE') or cache_dir()}")

    # -- indexing: a fresh database each time; the median run is the figure
    runs = []
    for r in range(args.index_repeats):
        db = work / f"index-{r}.db"
        cmd = cli + ["index", str(work / "photos"), "--db", str(db)] + opts
        if r == 0:
            say("\n== indexing: " + " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)))
        elapsed, proc = run_timed(cmd, env)
        summary = parse_summary(proc.stderr)
        if summary["embedded"] != len(photos):
            sys.exit(f"expected {len(photos)} embedded, got: {proc.stderr.strip()}")
        runs.append((elapsed, summary["seconds"]))
    index_s = statistics.median(r[0] for r in runs)
    inside_s = statistics.median(r[1] for r in runs)
    ours_rate = len(photos) / index_s
    say(f"lookalike  {len(photos)} images in {index_s:.1f}s = {ours_rate:.2f} images/s (whole process, "
        f"median of {len(runs)} runs with a fresh db: " + ", ".join(f"{r[0]:.1f}s" for r in runs)
        + f"; {len(photos) / inside_s:.2f} images/s over the {inside_s:.1f}s inside index(); "
        f"device {device}, workers {workers}, batch {args.batch_size})")
    again_s, proc = run_timed(cmd, env)
    second = parse_summary(proc.stderr)
    say(f"second run, nothing changed: {again_s:.2f}s whole process ({second['seconds']:.2f}s inside "
        f"index()), {second['embedded']} embedded, {second['unchanged']} unchanged")

    # -- a first run on a fresh machine: the model is exported to ONNX during the run
    with tempfile.TemporaryDirectory(prefix="lookalike-bench-cache-") as cache:
        first_db = work / "index-first.db"
        first_cmd = cli + ["index", str(work / "photos"), "--db", str(first_db)] + opts
        first_s, _ = run_timed(first_cmd, dict(env, LOOKALIKE_CACHE=cache))
    say(f"first run with an empty model cache (the ONNX export included): {first_s:.1f}s = "
        f"{len(photos) / first_s:.2f} images/s")

    # -- the naive loop as a whole process: the yardstick
    whole_s = naive_process(work / "photos", 448, env)
    say(f"naive process: {len(photos)} images in {whole_s:.1f}s = {len(photos) / whole_s:.2f} images/s "
        f"(whole process: full decode, one eager torch forward at 448 px)")
    say(f"ratio      lookalike / naive process = {ours_rate / (len(photos) / whole_s):.2f}x "
        f"(first run with an empty model cache: {whole_s / first_s:.2f}x)")

    # -- naive baseline doing lookalike's global work
    from indexer.store import Store

    store = Store(db, create=False)
    recipe = store.recipe()
    store.close()
    n_naive = min(args.naive_count or len(photos), len(photos))
    naive_paths = photos[:n_naive]
    subset = "" if n_naive == len(photos) else f" (a subset: the first {n_naive} of {len(photos)})"
    naive_s, build_s, stages, naive_vecs, naive_px = naive_embed(naive_paths, recipe, device)
    naive_rate = n_naive / naive_s
    say(f"naive      {n_naive} images in {naive_s:.1f}s = {naive_rate:.2f} images/s{subset}; loop only, "
        f"model built before ({build_s:.1f}s); per image: decode {1000 * stages['decode'] / n_naive:.0f} ms, "
        f"resize {1000 * stages['resize'] / n_naive:.0f} ms, forward {1000 * stages['forward'] / n_naive:.0f} ms "
        f"(torch eager, {device})")
    say(f"ratio      lookalike / naive (same work, loop only) = {ours_rate / naive_rate:.2f}x (both at longest side "
        f"{recipe.image_size}, scales {', '.join(f'{s:g}' for s in recipe.scales)})")

    # -- where lookalike's time goes
    decode_s, local_s, local_sizes, model_s, encoder = breakdown(photos, recipe, device, args.batch_size)
    say(f"\n== lookalike in pieces (in-process, one image at a time for decode, batches of <= "
        f"{args.batch_size} per shape for the model)")
    say(f"decode (draft mode + resize): {1000 * decode_s / len(photos):.0f} ms/image = "
        f"{len(photos) / decode_s:.1f} images/s on one core")
    if local_sizes:
        say(f"local features ({recipe.local_features}, {recipe.local_keypoints} keypoints at "
            f"{recipe.local_size} px): {1000 * local_s / len(photos):.0f} ms/image; "
            f"{statistics.mean(local_sizes) / 1000:.1f} KB/image stored (max {max(local_sizes) / 1000:.1f})")
    say(f"model ({encoder.engine}): {1000 * model_s / len(photos):.0f} ms/image = "
        f"{len(photos) / model_s:.1f} images/s")

    # -- same descriptors?
    ours = db_vectors(db)
    k = min(5, n_naive)
    cos = [float(np.dot(ours[str(p)], naive_vecs[i])) for i, p in enumerate(naive_paths)]
    same_px = [float(np.dot(encoder.embed(px)[0], naive_vecs[i])) for i, px in enumerate(naive_px[:k])]
    say("\n== descriptors: lookalike (index db) vs naive, cosine")
    say(f"over {n_naive} images: min {min(cos):.4f}, mean {statistics.mean(cos):.4f}; first {k}: "
        + ", ".join(f"{c:.4f}" for c in cos[:k]))
    say(f"same pixels ({encoder.engine} vs torch eager on the naive resize), first {k}: "
        + ", ".join(f"{c:.6f}" for c in same_px))

    # -- queries
    from search import Searcher

    say("\n== queries (k=10, query images are the indexed photos themselves)")
    with Searcher(db, device=args.device) as searcher:
        for p in photos[:len(sources)]:  # warm-up: model load, first run of each shape
            searcher.search(p, k=10)
            searcher.search(p, k=10, verify=0)
        depth = searcher.verify_depth(None)
        lat, lat_plain, hits, verified = [], [], 0, 0
        for i in range(args.queries):
            p = photos[i % len(photos)]
            # Interleaved, so that both see the same machine.
            t = time.perf_counter()
            matches = searcher.search(p, k=10)
            lat.append(time.perf_counter() - t)
            t = time.perf_counter()
            searcher.search(p, k=10, verify=0)
            lat_plain.append(time.perf_counter() - t)
            verified += sum(1 for m in matches if m.inliers)
            # Close re-encodes of one photo can have identical pixels after a 1/8 draft
            # decode, so the query file may tie with another file for first place.
            hits += any(m.path == str(p) for m in matches[:3])
    say(f"warm Searcher, {args.queries} queries, verification of the top {depth} (the default): "
        f"p50 {1000 * percentile(lat, 50):.0f} ms, p95 {1000 * percentile(lat, 95):.0f} ms, max "
        f"{1000 * max(lat):.0f} ms ({verified / args.queries:.1f} of 10 results verified per query; the "
        f"query file in the top 3: {hits}/{args.queries})")
    say(f"same queries with verify=0: p50 {1000 * percentile(lat_plain, 50):.0f} ms, p95 "
        f"{1000 * percentile(lat_plain, 95):.0f} ms; verified / unverified p50 = "
        f"{percentile(lat, 50) / percentile(lat_plain, 50):.2f}x")
    cold = []
    for i in range(args.cold_repeats):
        p = photos[(i * 7) % len(photos)]
        t, _ = run_timed(cli + ["query", str(p), "--db", str(db), "--device", args.device], env)
        cold.append(t)
    say(f"cold `lookalike query IMG --db DB`, {args.cold_repeats} runs: median {statistics.median(cold):.2f}s, "
        f"min {min(cold):.2f}s, max {max(cold):.2f}s")

    say("\n" + others_line(started))
    if args.keep:
        say(f"\nkept {work}")
    elif not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
