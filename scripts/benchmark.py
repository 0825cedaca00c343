"""Benchmark piscis and the baseline detectors on the annotated reference data.

Prints one markdown table, a row per method and setting, with the
integrated F1 (``f1_int``) and the F1 within 3 px (``f1@3``) on the
reporting parts of the reference data (see ``shared/data/README.md``):

- smFISH: ``real/insta-smfish``, whole;
- ISS, beads: the right half (x >= width // 2) of ``real/insta-iss`` and
  ``real/insta-beads``;
- semi: the mean over the 9 ``semisynthetic/insta/images/tissue_*`` images;

plus false spots on three spot-free noise images (Poisson 100 + Gaussian read
noise sd 5, 512x512 uint16), the speed of the whole in-process pipeline (read
a 2048x2048 TIFF, detect, write a CSV) and the peak memory of detecting
spots on a 4096x4096 TIFF in a fresh process.

Examples
--------
::

    OMP_NUM_THREADS=1 python scripts/benchmark.py --quick
    python scripts/benchmark.py --only piscis,bigfish --iss-scale 0.5
    python scripts/benchmark.py --write          # also scripts/benchmark_results.md
    python scripts/benchmark.py --retune         # redo the baselines' grid search
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RESULTS_MD = Path(__file__).resolve().with_name("benchmark_results.md")
for _p in (REPO, REPO / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import baselines  # noqa: E402

from piscis.metrics import score  # noqa: E402

logger = logging.getLogger(__name__)

DATASETS = ("smfish", "iss", "beads", "semi")
DATASET_TITLES = {"smfish": "smFISH", "iss": "ISS", "beads": "beads", "semi": "semi"}
NOISE_SEEDS = (0, 1, 2)
NOISE_SHAPE = (512, 512)
DASH = "–"

# The wrapper runs a command under an address-space cap (bytes; 0: none) and
# prints the child's exit status and peak RSS (kB).
_RSS_WRAPPER = (
    "import resource, subprocess, sys\n"
    "cap = int(sys.argv[1])\n"
    "def limit():\n"
    "    if cap > 0:\n"
    "        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))\n"
    "r = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, preexec_fn=limit)\n"
    "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
)


# --------------------------------------------------------------------------
# data


@dataclass
class Sample:
    """One annotated image (or the reporting part of one)."""

    name: str
    image: np.ndarray
    truth: np.ndarray


def read_image(path: Path) -> np.ndarray:
    """Read a PNG or TIFF as a 2D array in its own dtype (channel 0 of RGB(A))."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        img = tifffile.imread(path)
    else:
        import imageio.v3 as iio

        img = iio.imread(path)
    if img.ndim == 3:  # grey stored as RGB(A): R = G = B
        img = img[..., 0]
    return np.ascontiguousarray(img)


def read_spots(path: Path) -> np.ndarray:
    """Read the ``y`` and ``x`` columns of a spot CSV with a header."""
    table = np.genfromtxt(path, delimiter=",", names=True, ndmin=1)
    if table.size == 0:
        return np.zeros((0, 2))
    return np.column_stack([np.atleast_1d(table["y"]), np.atleast_1d(table["x"])]).astype(float)


def right_half(image: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop the right half (x >= width // 2) of an image and shift its spots to the crop."""
    x0 = image.shape[1] // 2
    keep = truth[:, 1] >= x0 - 0.5
    return image[:, x0:], truth[keep] - np.array([0.0, x0])


def load_datasets(data: Path) -> dict[str, list[Sample]]:
    """Load the reporting parts of the reference data that are present under ``data``.

    Parameters
    ----------
    data : Path
        The ``shared/data`` folder.

    Returns
    -------
    dict
        ``{"smfish" | "iss" | "beads" | "semi": [Sample, ...]}``; absent
        datasets are left out (and logged).
    """
    out: dict[str, list[Sample]] = {}
    for key, folder, half in [
        ("smfish", "real/insta-smfish", False),
        ("iss", "real/insta-iss", True),
        ("beads", "real/insta-beads", True),
    ]:
        img_p, csv_p = data / folder / "image.png", data / folder / "spots.csv"
        if not (img_p.exists() and csv_p.exists()):
            logger.warning("skipping %s: %s not found", key, data / folder)
            continue
        image, truth = read_image(img_p), read_spots(csv_p)
        if half:
            image, truth = right_half(image, truth)
        out[key] = [Sample(folder, image, truth)]
    semi = data / "semisynthetic" / "insta"
    samples = []
    for img_p in sorted((semi / "images").glob("tissue_*.png")):
        csv_p = semi / "spots" / (img_p.stem + ".csv")
        if csv_p.exists():
            samples.append(Sample(img_p.stem, read_image(img_p), read_spots(csv_p)))
    if samples:
        out["semi"] = samples
    else:
        logger.warning("skipping semi: no tissue_* images under %s", semi)
    return out


def noise_images() -> list[np.ndarray]:
    """Three spot-free 512x512 uint16 images: Poisson(100) + Gaussian(sd 5), seeds 0, 1, 2."""
    images = []
    for seed in NOISE_SEEDS:
        rng = np.random.default_rng(seed)
        img = rng.poisson(100.0, NOISE_SHAPE) + rng.normal(0.0, 5.0, NOISE_SHAPE)
        images.append(np.clip(np.rint(img), 0, 65535).astype(np.uint16))
    return images


def tiled_terra(data: Path, n: int) -> np.ndarray | None:
    """``pypi/spotiflow/img_terra_2d.tif`` (1024x1024) tiled n x n, or None if absent."""
    path = data / "pypi" / "spotiflow" / "img_terra_2d.tif"
    if not path.exists():
        logger.warning("no speed/memory image: %s not found", path)
        return None
    return np.tile(read_image(path), (n, n))


# --------------------------------------------------------------------------
# methods


@dataclass
class Method:
    """One row of the table: a detector with fixed settings.

    Attributes
    ----------
    label : str
        Row name.
    fn : callable
        ``fn(image, scale=...) -> (N, 2)``; ``scale`` is only passed where
        ``scales`` has an entry for the dataset.
    memory_cmd : list of str or None
        Command that detects spots in the TIFF named ``{image}`` into the
        folder/file ``{out}``, for the peak-memory measurement.
    scales : dict
        Per-dataset ``scale`` argument (piscis only).
    reuse : str or None
        Label of a row whose scores to copy for the datasets without a scale
        here (the extra piscis row of ``--iss-scale``).
    timed : bool
        Measure speed and memory for this row.
    noise_fn : callable or None
        Stand-in for ``fn`` on the noise images where it finds the same
        number of spots faster (Big-FISH without ``fit_subpixel``, which moves
        spots but never adds or drops one).
    copy_of : str or None
        Label of an earlier row with identical settings: copy its results.
    """

    label: str
    fn: Callable[..., np.ndarray]
    memory_cmd: list[str] | None = None
    scales: dict[str, float] = field(default_factory=dict)
    reuse: str | None = None
    timed: bool = True
    noise_fn: Callable[..., np.ndarray] | None = None
    copy_of: str | None = None


def piscis_methods(iss_scale: float, model_name: str = "default") -> list[Method]:
    """Build the piscis rows, or none (with a warning) if its API is not importable.

    Parameters
    ----------
    iss_scale : float
        If not 1, add a row with this ``scale`` on ISS (the other datasets'
        figures copied from the plain row).
    model_name : str
        Shipped model name or model folder, for ``load_model``.
    """
    try:
        from piscis.detect import detect
        from piscis.io import load_model

        model = load_model(model_name)
    except Exception as exc:  # noqa: BLE001 - any failure means: no piscis row
        logger.warning("skipping piscis: %s: %s", type(exc).__name__, exc)
        return []

    def run(image: np.ndarray, scale: float = 1.0) -> np.ndarray:
        result = detect(image, model=model, threshold=None, scale=scale)
        return np.asarray(result.coords, dtype=float).reshape(-1, 2)

    cmd = [sys.executable, "-m", "piscis", "count", "{image}", "-o", "{out}"]
    if model_name != "default":
        cmd += ["--model", str(model_name)]
    name = "default model" if model_name == "default" else f"model {model_name}"
    rows = [Method(f"piscis, {name}", run, memory_cmd=cmd)]
    if iss_scale != 1.0:
        rows.append(
            Method(
                f"piscis, {name}, ISS at scale {iss_scale:g}",
                run,
                scales={"iss": iss_scale},
                reuse=rows[0].label,
                timed=False,
            )
        )
    return rows


def baseline_methods(keys: list[tuple[str, list[str]]], tuned: dict) -> list[Method]:
    """Rows for the baselines ``[(key, settings), ...]`` that can run here."""
    rows = []
    seen: dict[str, str] = {}
    for key, settings in keys:
        b = baselines.BASELINES[key]
        ok, why = baselines.available(key)
        if not ok:
            logger.warning("skipping %s: %s", key, why)
            continue
        for setting in settings:
            params = b.params(setting, tuned)
            if params is None:
                logger.warning("skipping %s dev-tuned: not tuned (run with --retune)", key)
                continue
            shown = ", ".join(
                f"{k} {_fmt_param(k, v)}"
                for k, v in params.items()
                if k not in ("voxel_size", "subpixel")
            )
            name = "default" if setting == "default" else "dev-tuned"
            label = f"{b.label}, {name} ({shown})"
            ident = json.dumps([b.fn.__name__, params], sort_keys=True)
            noise_fn = None
            if params.get("subpixel"):
                plain = {**params, "subpixel": False}
                noise_fn = lambda image, _fn=b.fn, _p=plain: _fn(image, **_p)  # noqa: E731
            rows.append(
                Method(
                    label,
                    lambda image, _fn=b.fn, _p=params: _fn(image, **_p),
                    memory_cmd=[
                        sys.executable,
                        str(Path(baselines.__file__).resolve()),
                        "run",
                        key,
                        setting,
                        "{image}",
                        "{out}/spots.csv",
                    ],
                    noise_fn=noise_fn,
                    copy_of=seen.get(ident),
                )
            )
            seen.setdefault(ident, label)
    return rows


def _fmt_param(name: str, v) -> str:
    if v is None and name == "threshold":
        return "auto"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# --------------------------------------------------------------------------
# measurements


def evaluate(method: Method, datasets: dict[str, list[Sample]]) -> dict[str, tuple]:
    """Mean ``(f1_int, f1_3)`` per dataset."""
    out = {}
    for key, samples in datasets.items():
        kw = {"scale": method.scales[key]} if key in method.scales else {}
        scores = [score(method.fn(s.image, **kw), s.truth) for s in samples]
        out[key] = (
            float(np.mean([s.f1_int for s in scores])),
            float(np.mean([s.f1_3 for s in scores])),
        )
        logger.info("  %-6s f1_int %.3f  f1@3 %.3f", key, *out[key])
    return out


def noise_counts(method: Method, images: list[np.ndarray]) -> list[int]:
    """Count the spots found on each spot-free image."""
    fn = method.noise_fn or method.fn
    return [len(fn(img)) for img in images]


def pipeline_speed(method: Method, tif: Path, workdir: Path) -> float:
    """Mpx/s of reading ``tif``, detecting spots and writing a CSV, in this process.

    The method is warmed up first on a small crop (imports, model sessions),
    so that one-off start-up costs are not counted.
    """
    import tifffile

    image = tifffile.imread(tif)
    method.fn(np.ascontiguousarray(image[:256, :256]))
    t0 = time.perf_counter()
    image = tifffile.imread(tif)
    coords = method.fn(image)
    np.savetxt(workdir / "speed.csv", coords, delimiter=",", header="y,x", comments="", fmt="%.3f")
    wall = time.perf_counter() - t0
    return image.size / 1e6 / wall


def peak_memory_mb(cmd: list[str], timeout: float, cap_mb: float = 0.0) -> float | str | None:
    """Peak RSS (MB) of ``cmd`` run in a fresh wrapper process.

    Parameters
    ----------
    cmd : list of str
        The command.
    timeout : float
        Seconds before it is stopped.
    cap_mb : float
        Address-space limit (RLIMIT_AS) of the command in MB; 0 for none. A
        run that fails under it is reported as ``"> cap"``.

    Returns
    -------
    float, str or None
        MB; ``"> N"`` when the run failed under the cap; None on other failures.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    cap = int(cap_mb * 2**20)
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _RSS_WRAPPER, str(cap), *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=REPO,
            env=env,
        )
    except subprocess.TimeoutExpired:
        logger.warning("  memory run timed out after %.0f s", timeout)
        return None
    try:
        rc, kb = proc.stdout.split()[-2:]
    except ValueError:
        rc, kb = "?", "0"
    if proc.returncode == 0 and rc == "0":
        return int(kb) / 1024.0
    err = proc.stderr.strip()
    if cap and (
        "MemoryError" in err
        or "bad_alloc" in err
        or "Failed to allocate" in err
        or "Cannot allocate memory" in err
        or rc.startswith("-")
    ):
        logger.warning(
            "  memory run failed under the %.0f MB cap (exit %s): %s", cap_mb, rc, err[-300:]
        )
        return f"> {cap_mb:.0f}"
    logger.warning("  memory run failed (exit %s): %s", rc, err[-500:])
    return None


# --------------------------------------------------------------------------
# table


COLUMNS = (
    ["method / setting"]
    + [f"{DATASET_TITLES[d]} {m}" for d in DATASETS for m in ("f1_int", "f1@3")]
    + ["noise false spots / Mpx (per image)", "Mpx/s", "peak memory (MB)"]
)


def format_row(label: str, res: dict) -> str:
    """One markdown row from a result dict (missing figures shown as a dash)."""
    cells = [label]
    for d in DATASETS:
        pair = res.get(d)
        cells += [f"{v:.3f}" for v in pair] if pair else [DASH, DASH]
    counts = res.get("noise")
    if counts is None:
        cells.append(DASH)
    else:
        mpx = NOISE_SHAPE[0] * NOISE_SHAPE[1] / 1e6
        per_mpx = np.mean(counts) / mpx
        cells.append(f"{per_mpx:.0f} ({','.join(str(c) for c in counts)})")
    cells.append(f"{res['speed']:.2f}" if res.get("speed") else DASH)
    cells.append(_fmt_mb(res["memory"]) if res.get("memory") else DASH)
    return "| " + " | ".join(cells) + " |"


def _fmt_mb(mb) -> str:
    return mb if isinstance(mb, str) else f"{mb:.0f}"


def make_table(results: list[tuple[str, dict]]) -> str:
    """Build the markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [format_row(label, res) for label, res in results]
    return "\n".join(lines)


def notes(args, tuned: dict) -> str:
    """Conditions of the run, for ``benchmark_results.md``."""
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    return "\n".join(
        [
            f"Measured on {date.today().isoformat()} with `scripts/benchmark.py`, "
            f"{os.cpu_count()} CPU cores, OMP_NUM_THREADS={threads}.",
            "",
            "- Scores on the reporting parts only: `real/insta-smfish` whole, the right half "
            "(x >= width//2) of `real/insta-iss` and `real/insta-beads`, the mean over the 9 "
            "`semisynthetic/insta` `tissue_*` images. `f1_int`: F1 integrated over 0-3 px; "
            "`f1@3`: F1 within 3 px (Hungarian one-to-one matching, `piscis.metrics`).",
            "- Noise: false spots per megapixel, mean over three spot-free 512x512 uint16 images "
            "(Poisson 100 + read noise sd 5, seeds 0, 1, 2); spots per image in brackets.",
            "- Mpx/s: 2048x2048 uint16 TIFF (spotiflow `img_terra_2d.tif` tiled 2x2): read, "
            "detect, write a CSV, in-process after a warm-up; model loading not counted. "
            "Peak memory: peak RSS of a fresh process detecting spots in a 4096x4096 TIFF "
            "(tiled 4x4): `python -m piscis count` for piscis, `scripts/baselines.py run` "
            "for the baselines, under an address-space cap (`--memory-cap-mb`, "
            f"{args.memory_cap_mb:.0f} MB): `> N` means the run failed under it; a dash, that it "
            "was skipped as slower than `--memory-max-s`.",
            f"- *default*: as shipped; *dev-tuned*: the best integrated F1 of a 20-45 setting grid "
            f"on `{baselines.TUNING_DATASET}`, then fixed for every image "
            f"(`scripts/baselines_tuned.json`). blob_log, trackpy and the LoG reference see each "
            f"image rescaled to its 1st-99.8th percentile; Big-FISH gets the image in its own "
            f"dtype, and its dev-tuned `threshold_factor` multiplies its automatic threshold "
            f"on each image; U-FISH uses the ONNX model shipped in its wheel, on the whole image "
            f"at once.",
        ]
    )


# --------------------------------------------------------------------------
# main


def tiling_check(model_name: str) -> str:
    """Tiled (4x4 tiles of 256 px) against untiled detection on a 1024x1024 image
    with 256 spots, 64 of them on the tile seams (CASES.md C05)."""
    from piscis.detect import detect
    from piscis.io import load_model
    from piscis.metrics import match
    from piscis.synth import spot_image

    rng = np.random.default_rng(5)
    seams = [255.5, 256.0, 511.5, 512.0, 767.5, 768.0]
    pts = [(256.0, 256.0), (512.0, 512.0), (768.0, 768.0)]
    while len(pts) < 64:
        along = rng.uniform(8, 1016)
        on = seams[len(pts) % len(seams)]
        p = (on, along) if len(pts) % 2 else (along, on)
        if all(np.hypot(p[0] - q[0], p[1] - q[1]) >= 6 for q in pts):
            pts.append(p)
    while len(pts) < 256:
        p = tuple(rng.uniform(4, 1019, 2))
        if all(np.hypot(p[0] - q[0], p[1] - q[1]) >= 6 for q in pts):
            pts.append(p)
    image, truth = spot_image(rng, (1024, 1024), coords=np.array(pts))
    model = load_model(model_name)
    whole = detect(image, model=model, tile_size=2048).coords
    tiled = detect(image, model=model, tile_size=256).coords
    pi, ti = match(tiled, whole, 0.1)
    dmax = float(np.abs(tiled[pi] - whole[ti]).max()) if len(pi) else float("nan")
    found = len(match(whole, truth, 1.5)[0])
    return (
        f"Tiling check (1024x1024, 256 spots, 64 on tile seams): untiled {len(whole)} spots, "
        f"tiled (4x4 tiles of 256 px) {len(tiled)}; {len(pi)} matched within 0.1 px "
        f"(largest coordinate difference {dmax:.2g} px); {found}/256 true spots found "
        f"within 1.5 px."
    )


def parse_only(only: str | None) -> tuple[bool, list[tuple[str, list[str]]]]:
    """``--only`` -> (run piscis?, [(baseline key, settings), ...])."""
    all_settings = ["default", "tuned"]
    if not only:
        return True, [(k, all_settings) for k in baselines.BASELINES]
    want_piscis, keys = False, []
    for item in only.split(","):
        name, _, setting = item.strip().partition(":")
        if name == "piscis":
            want_piscis = True
        elif name in baselines.BASELINES:
            if setting and setting not in all_settings:
                raise SystemExit(f"unknown setting {setting!r} (default or tuned)")
            keys.append((name, [setting] if setting else all_settings))
        elif name:
            raise SystemExit(
                f"unknown method {name!r}; choose from piscis, {', '.join(baselines.BASELINES)}"
            )
    return want_piscis, keys


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="the shared/data folder (default: %(default)s)",
    )
    parser.add_argument(
        "--only",
        help="comma-separated methods: piscis,"
        + ",".join(baselines.BASELINES)
        + " (a baseline may end in :default or :tuned)",
    )
    parser.add_argument("--quick", action="store_true", help="skip speed and memory")
    parser.add_argument(
        "--iss-scale",
        type=float,
        default=1.0,
        help="also a piscis row with this scale on ISS (default 1.0: no row)",
    )
    parser.add_argument(
        "--model",
        default="default",
        help="piscis model: a shipped name or a model folder (default: default)",
    )
    parser.add_argument(
        "--retune", action="store_true", help="redo the baselines' grid search on real/insta-smfish"
    )
    parser.add_argument(
        "--memory-max-s",
        type=float,
        default=90.0,
        help="skip a peak-memory run expected to take longer "
        "(4x the 2048x2048 time; default %(default)s s)",
    )
    parser.add_argument(
        "--memory-cap-mb",
        type=float,
        default=8192.0,
        help="address-space cap of a peak-memory run, MB (0: none; default %(default)s)",
    )
    parser.add_argument("--write", action="store_true", help=f"also write {RESULTS_MD.name}")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("PIL", "matplotlib", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    want_piscis, keys = parse_only(args.only)
    datasets = load_datasets(args.data)

    # dev tuning: once, or again with --retune
    tuned = baselines.load_tuned()
    tune_keys = [
        k
        for k, s in keys
        if "tuned" in s
        and baselines.BASELINES[k].grid is not None
        and (args.retune or k not in tuned)
    ]
    for k, s in keys:  # a key tuned through another one (bigfish_subpixel -> bigfish)
        src = baselines.BASELINES[k].tuned_from
        if "tuned" in s and src and (args.retune or src not in tuned) and src not in tune_keys:
            tune_keys.append(src)
    if tune_keys:
        if "smfish" in datasets:
            logger.info("tuning %s on %s ...", ", ".join(tune_keys), baselines.TUNING_DATASET)
            s = datasets["smfish"][0]
            tuned = baselines.tune(s.image, s.truth, keys=tune_keys)
        else:
            logger.warning("cannot tune %s: %s absent", tune_keys, baselines.TUNING_DATASET)

    methods = piscis_methods(args.iss_scale, args.model) if want_piscis else []
    methods += baseline_methods(keys, tuned)
    if not methods:
        logger.error("no method to run")
        return 1

    noise = noise_images()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="piscis-bench-") as tmp:
        tmp = Path(tmp)
        tif2k = tif4k = None
        if not args.quick:
            import tifffile

            big = tiled_terra(args.data, 2)
            if big is not None:
                tif2k, tif4k = tmp / "terra_2048.tif", tmp / "terra_4096.tif"
                tifffile.imwrite(tif2k, big)
                tifffile.imwrite(tif4k, np.tile(big, (2, 2)))
        for m in methods:
            logger.info("%s", m.label)
            res: dict = {}
            try:
                if m.copy_of:
                    logger.info("  same settings as %r: results copied", m.copy_of)
                    res = dict(results[m.copy_of])
                elif m.reuse:
                    res = {
                        k: v
                        for k, v in results[m.reuse].items()
                        if k in DATASETS and k not in m.scales
                    }
                    res.update(evaluate(m, {k: v for k, v in datasets.items() if k in m.scales}))
                else:
                    res.update(evaluate(m, datasets))
                    res["noise"] = noise_counts(m, noise)
                    logger.info("  noise  %s spots", res["noise"])
                if m.timed and not m.copy_of and tif2k is not None:
                    t0 = time.perf_counter()
                    res["speed"] = pipeline_speed(m, tif2k, tmp)
                    wall = time.perf_counter() - t0
                    logger.info("  speed  %.2f Mpx/s", res["speed"])
                    est = 4.0 * wall
                    if m.memory_cmd is None:
                        pass
                    elif est > args.memory_max_s:
                        logger.info("  memory skipped: ~%.0f s expected (> --memory-max-s)", est)
                    else:
                        out = Path(tempfile.mkdtemp(prefix="out-", dir=tmp))  # fresh, empty
                        cmd = [c.format(image=tif4k, out=out) for c in m.memory_cmd]
                        res["memory"] = peak_memory_mb(
                            cmd, timeout=max(60.0, 3 * est + 30), cap_mb=args.memory_cap_mb
                        )
                        if res["memory"]:
                            logger.info("  memory %s MB", _fmt_mb(res["memory"]))
            except Exception:  # noqa: BLE001 - report and go on with the other rows
                logger.exception("  %s failed", m.label)
            results[m.label] = res

    table = make_table(list(results.items()))
    extra = ""
    if want_piscis and methods and not args.quick:
        extra = "\n" + tiling_check(args.model) + "\n"
    print(table + extra)
    if args.write:
        RESULTS_MD.write_text(
            "# Benchmark results\n\n" + notes(args, tuned) + "\n\n" + table + "\n" + extra
        )
        logger.info("wrote %s", RESULTS_MD)
    return 0


if __name__ == "__main__":
    sys.exit(main())
