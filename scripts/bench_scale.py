"""Scale benchmark (issue #5): one huge image streamed from its file, and a folder of
images through 1 process, a local Dask cluster of 1 and of 2 workers.

    python scripts/bench_scale.py            # full: 16384 x 16384, 200 images of 1024 x 1024
    python scripts/bench_scale.py --quick    # small sizes, to check that it works

Part 1. A 16384 x 16384 uint16 image made by repeating a real one (``real/insta-smfish``,
mirror-wise, tile by tile) saved as Zarr and as a tiled BigTIFF; and the C18 field
(20000 spots on a jittered grid). ``piscis count`` on each, in a fresh process: wall
time and peak RSS; the spots against the image cut into crops by hand (each detected
in memory with the whole image's normalisation): matched within 0.1 px; C18's count
against the truth (within 0.5%) at two tile sizes.

Part 3 (``--volume``). The C18 volume: 64 x 4096 x 4096 uint16 (2 GB) as Zarr, 50000
spots (sigma_z 1.5, sigma_yx 1 px, amplitude 400 over 100, noise sd 5) at z 5-58 on a
jittered yx grid, written tile by tile; ``piscis count --axes ZYX`` in a fresh process at
two tile sizes: wall time, peak RSS, count against the truth (within 0.5%), the spots
within 1.5 px of the truth, and whether the two runs' files are identical.

Part 2. A folder of 200 images of 1024 x 1024 (crops of the same real image, each with
its own noise): the serial process (torch on every core), one Dask worker of one
thread, two such workers. Wall time, peak RSS of every process, images per second, the
speed-up of two workers over one beside the ideal 2x, and the files compared byte for
byte with the serial run's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL = ROOT.parent / "shared" / "data" / "real" / "insta-smfish" / "image.png"

# Run piscis and print this process's peak resident memory: VmHWM, which (unlike
# ru_maxrss, kept across exec from the parent) belongs to this process alone.
PEAK = (
    "import runpy, sys\n"
    "sys.argv = ['piscis', *sys.argv[1:]]\n"
    "try:\n"
    "    runpy.run_module('piscis', run_name='__main__')\n"
    "finally:\n"
    "    from pathlib import Path\n"
    "    st = Path('/proc/self/status').read_text().split('VmHWM:')[1].split()[0]\n"
    "    print(f'PEAK_RSS_MB {int(st) / 1024:.0f}', file=sys.stderr)\n"
)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (Linux: VmHWM)."""
    return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024


def run_count(args: list[str], env: dict | None = None) -> tuple[int, float, float, str]:
    """``piscis count ARGS`` in a fresh process: (exit code, wall s, peak RSS MB, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, "-c", PEAK, "count", *args], env=env, capture_output=True, text=True
    )
    wall = time.time() - t0
    peak = (
        float(r.stderr.rsplit("PEAK_RSS_MB ", 1)[1].split()[0])
        if "PEAK_RSS_MB" in r.stderr
        else float("nan")
    )
    return r.returncode, wall, peak, r.stderr


# --------------------------------------------------------------------------- by hand


def by_hand(plane, model, crop: int = 4096, overlap: int = 128) -> np.ndarray:
    """Spots of ``plane`` cut by hand into crops of ``crop`` px plus ``overlap`` on each
    side, each detected in memory (:func:`piscis.detect.predict_maps`) with the whole
    image's normalisation; a spot is kept by the crop whose core holds its position."""
    from piscis.detect import predict_maps, spots_from_maps
    from piscis.lazy import lazy_normalization

    norm = lazy_normalization(plane, model.compression, model.contrast_ratio)
    h, w = plane.shape
    out = []
    for y0 in range(0, h, crop):
        for x0 in range(0, w, crop):
            # Crop origins on the network's multiple: the crop sees what the image does.
            wy0, wx0 = max(0, y0 - overlap), max(0, x0 - overlap)
            wy1, wx1 = min(h, y0 + crop + overlap), min(w, x0 + crop + overlap)
            img = plane[wy0:wy1, wx0:wx1]
            maps, _ = predict_maps(img, model, norm=norm, tile_size=1024)
            spots = spots_from_maps(maps, img, model.threshold)
            c = spots.coords + [wy0, wx0]
            r = np.floor(c + 0.5)
            keep = (r[:, 0] >= y0) & (r[:, 0] < y0 + crop) & (r[:, 1] >= x0) & (r[:, 1] < x0 + crop)
            out.append(c[keep])
    return np.concatenate(out) if out else np.zeros((0, 2))


def compare(a: np.ndarray, b: np.ndarray, cutoff: float = 0.1) -> tuple[float, int]:
    """Largest distance of matched pairs (one to one within ``cutoff``), and the number
    of spots of either set left unmatched."""
    from scipy.spatial import cKDTree

    # Mutual nearest neighbours within the cutoff: one to one, since spots are more than
    # 2 cutoffs apart (a Hungarian matching of 200,000 spots would not fit in memory).
    ia = ib = np.zeros(0, int)
    if len(a) and len(b):
        da, ja = cKDTree(b).query(a, distance_upper_bound=cutoff)
        _, jb = cKDTree(a).query(b, distance_upper_bound=cutoff)
        hit = np.flatnonzero(np.isfinite(da))
        hit = hit[jb[ja[hit]] == hit]
        ia, ib = hit, ja[hit]
    worst = float(np.max(np.hypot(*(a[ia] - b[ib]).T))) if len(ia) else 0.0
    return worst, len(a) - len(ia) + len(b) - len(ib)


# --------------------------------------------------------------------------- inputs


def real_source() -> np.ndarray:
    """The real image as uint16 (16 x its 8-bit grey levels), or a synthetic stand-in."""
    if REAL.exists():
        from skimage import io as skio

        img = np.asarray(skio.imread(REAL))
        img = img if img.ndim == 2 else img[..., 0]
        return img.astype(np.uint16) * 16
    from piscis.synth import spot_image

    print(f"({REAL} not found: a synthetic image stands in)")
    return spot_image(np.random.default_rng(0), (450, 700), n_spots=120)[0]


def make_folder(folder: Path, n: int, size: int, source: np.ndarray) -> None:
    """``n`` images of ``size`` px: mirror-repeated crops of the source plus noise."""
    from piscis.synth_large import mirror_tiles

    tile = mirror_tiles(source)
    folder.mkdir(parents=True, exist_ok=True)
    import tifffile

    for i in range(n):
        rng = np.random.default_rng(i)
        img = tile(int(rng.integers(0, 2000)), int(rng.integers(0, 2000)), size, size).astype(float)
        img = np.clip(np.round(img + rng.normal(0, 20, img.shape)), 0, 65535).astype(np.uint16)
        tifffile.imwrite(folder / f"img{i:04d}.tif", img)


# --------------------------------------------------------------------------- parts


def part_large(work: Path, size: int, n_spots: int, tiles: tuple[int, int]) -> None:
    from piscis.io import load_model
    from piscis.lazy import open_lazy
    from piscis.synth_large import jittered_grid, mirror_tiles, render_field, write_large

    print(f"\n## Part 1: one {size} x {size} uint16 image\n")
    model = load_model()
    source = mirror_tiles(real_source())
    t0 = time.time()
    write_large(work / "real.zarr", (size, size), source)
    write_large(work / "real.tif", (size, size), source)
    truth = jittered_grid((size, size), n_spots, seed=18)
    write_large(work / "c18.tif", (size, size), render_field(truth, seed=18))
    print(f"inputs written tile by tile in {time.time() - t0:.0f} s\n")
    env = {"OMP_NUM_THREADS": "1", "PISCIS_STREAM_PIXELS": str(min(size * size - 1, 8192 * 8192))}
    print("| input | tile size | spots | wall (s) | peak RSS (MB) | check |")
    print("|---|---|---|---|---|---|")
    hand = by_hand(open_lazy(work / "real.zarr"), model, crop=max(512, size // 4), overlap=128)
    for name in ("real.zarr", "real.tif"):
        out = work / f"out-{name}"
        rc, wall, peak, err = run_count(
            [str(work / name), "-o", str(out), "-q", "--tile-size", str(tiles[0])], env
        )
        got = np.loadtxt(out / "spots" / "real.csv", delimiter=",", skiprows=1, ndmin=2)[:, :2]
        worst, unmatched = compare(got, hand)
        check = (
            f"by hand: {len(hand)} spots, {unmatched} unmatched, largest difference {worst:.2g} px"
        )
        print(f"| {name} | {tiles[0]} | {len(got)} | {wall:.1f} | {peak:.0f} | {check} |")
    counts = {}
    for t in tiles:
        out = work / f"out-c18-{t}"
        rc, wall, peak, err = run_count(
            [str(work / "c18.tif"), "-o", str(out), "-q", "--tile-size", str(t)], env
        )
        counts[t] = (out / "spots" / "c18.csv").read_bytes()
        n = len(np.loadtxt(out / "spots" / "c18.csv", delimiter=",", skiprows=1, ndmin=2))
        print(
            f"| C18 (truth {n_spots}) | {t} | {n} | {wall:.1f} | {peak:.0f} | "
            f"{100 * (n - n_spots) / n_spots:+.2f}% of truth |"
        )
    print(f"\nC18: tile sizes {tiles} give identical files: {len(set(counts.values())) == 1}")


def part_volume(work: Path, shape: tuple[int, int, int], n_spots: int, tiles) -> None:
    from piscis.metrics import match
    from piscis.synth_large import jittered_grid, render_volume_plane, write_volume

    nz, h, w = shape
    print(f"\n## Part 3: one {nz} x {h} x {w} uint16 volume (Zarr)\n")
    rng = np.random.default_rng(183)
    yx = jittered_grid((h, w), n_spots, seed=183)
    truth = np.column_stack([rng.uniform(5, nz - 6, len(yx)), yx])
    t0 = time.time()
    write_volume(work / "vol.zarr", shape, render_volume_plane(truth, seed=183))
    print(f"volume written tile by tile in {time.time() - t0:.0f} s\n")
    print("| tile size | spots | wall (s) | peak RSS (MB) | count vs truth | within 1.5 px |")
    print("|---|---|---|---|---|---|")
    files = {}
    for t in tiles:
        out = work / f"out-vol-{t}"
        rc, wall, peak, err = run_count(
            [str(work / "vol.zarr"), "--axes", "ZYX", "-o", str(out), "-q", "--tile-size", str(t)]
        )
        if rc != 0:
            print(f"| {t} | failed (exit {rc}): {err.strip().splitlines()[-1:]} | | | | |")
            continue
        csv = out / "spots" / "vol.csv"
        files[t] = csv.read_bytes()
        got = np.loadtxt(csv, delimiter=",", skiprows=1, ndmin=2, usecols=(0, 1, 2))
        # Truth rows sorted by y: match in bands of 512 rows to keep the matching small.
        n_hit = 0
        for y0 in range(0, h, 512):
            a = got[(got[:, 1] >= y0) & (got[:, 1] < y0 + 512)]
            b = truth[(truth[:, 1] >= y0 - 2) & (truth[:, 1] < y0 + 514)]
            pi, ti = match(a, b, 1.5)
            inside = (b[ti, 1] >= y0) & (b[ti, 1] < y0 + 512)
            n_hit += int(np.count_nonzero(inside))
        print(
            f"| {t} | {len(got)} | {wall:.1f} | {peak:.0f} | "
            f"{100 * (len(got) - n_spots) / n_spots:+.2f}% | {n_hit} of {n_spots} |"
        )
    if len(files) > 1:
        same = len(set(files.values())) == 1
        print(f"\nvolume: tile sizes {tuple(files)} give identical files: {same}")


def _cluster_run(folder: Path, out: Path, n_workers: int) -> tuple[float, list[float], int]:
    """``piscis count --scheduler`` on a fresh local cluster: wall, peak RSS per process."""
    from distributed import Client

    from piscis.batch import local_cluster

    os.environ["OMP_NUM_THREADS"] = "1"
    with local_cluster(n_workers) as cluster, Client(cluster) as client:
        client.run(lambda: __import__("piscis.detect"))  # workers started, torch imported
        rc, wall, peak, err = run_count(
            [str(folder), "-o", str(out), "-q", "--scheduler", cluster.scheduler_address]
        )
        workers = client.run(peak_rss_mb)
    return wall, [peak, *workers.values()], rc


def part_folder(work: Path, n: int, size: int) -> None:
    from piscis.batch import output_files

    print(f"\n## Part 2: a folder of {n} images of {size} x {size}\n")
    folder = work / "folder"
    make_folder(folder, n, size, real_source())
    rows = []
    rc, wall, peak, _ = run_count([str(folder), "-o", str(work / "serial"), "-q"])
    rows.append(("serial process (torch on all cores)", wall, [peak], rc))
    rc, wall, peak, _ = run_count(
        [str(folder), "-o", str(work / "one"), "-q"], {"OMP_NUM_THREADS": "1"}
    )
    rows.append(("serial process, 1 thread", wall, [peak], rc))
    for k in (1, 2):
        wall, peaks, rc = _cluster_run(folder, work / f"cluster{k}", k)
        rows.append((f"local cluster, {k} worker(s) x 1 thread", wall, peaks, rc))
    print("| run | wall (s) | images/s | peak RSS per process (MB) | files = serial |")
    print("|---|---|---|---|---|")
    ref = output_files(work / "serial")
    for (name, wall, peaks, rc), out in zip(rows, ["serial", "one", "cluster1", "cluster2"]):
        same = output_files(work / out) == ref
        print(
            f"| {name} | {wall:.1f} | {n / wall:.2f} | {', '.join(f'{p:.0f}' for p in peaks)} | "
            f"{same} (exit {rc}) |"
        )
    w1, w2, ws = rows[2][1], rows[3][1], rows[0][1]
    print(
        f"\nspeed-up of 2 workers over 1: {w1 / w2:.2f}x (ideal 2x); "
        f"over the serial process: {ws / w2:.2f}x"
    )
    print("(the cluster walls include the client's start and the model load on each worker)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the script")
    ap.add_argument(
        "--work", default=None, help="working folder (default: a temporary one, removed)"
    )
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--skip-folder", action="store_true")
    ap.add_argument("--volume", action="store_true", help="also part 3, the C18 volume")
    ap.add_argument(
        "--volume-tiles",
        type=int,
        nargs="+",
        default=None,
        help="tile sizes of part 3 (default 1024 2048; quick 256 512)",
    )
    a = ap.parse_args(argv)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="piscis-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"# piscis scale benchmark ({'quick' if a.quick else 'full'}), "
        f"{os.cpu_count()} CPU(s), {time.strftime('%Y-%m-%d')}"
    )
    try:
        if not a.skip_large:
            if a.quick:
                part_large(work, 2048, 300, (256, 512))
            else:
                part_large(work, 16384, 20000, (1024, 2048))
        if a.volume:
            if a.quick:
                part_volume(work, (16, 1024, 1024), 3000, tuple(a.volume_tiles or (256, 512)))
            else:
                part_volume(work, (64, 4096, 4096), 50000, tuple(a.volume_tiles or (1024, 2048)))
        if not a.skip_folder:
            part_folder(work, *((12, 256) if a.quick else (200, 1024)))
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
