"""Classical and pretrained spot detectors that piscis is compared against.

Each baseline is a function ``fn(image, **params) -> coords`` taking a 2D
image (any real dtype; converted to float where the tool needs it) and
returning an ``(N, 2)`` float array of ``(y, x)`` positions, 0-based, the
centre of pixel (0, 0) at (0.0, 0.0). The optional libraries (Big-FISH,
trackpy, U-FISH) are imported inside the functions, so this module imports
without them; :func:`available` tells whether a tool can run.

``BASELINES`` maps a short key to a :class:`Baseline`: the function, the
tool's *default* parameters, and the grid from which :func:`tune` picks the
*dev-tuned* setting (the best integrated F1 on ``real/insta-smfish``, then
fixed for every image). The chosen settings are kept in
``baselines_tuned.json`` beside this file so that the benchmark does not
re-tune on every run.

Run ``python scripts/baselines.py run KEY SETTING IMAGE.tif OUT.csv`` to
detect spots on one TIFF in a fresh process (the benchmark uses it to
measure peak memory).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

logger = logging.getLogger(__name__)

TUNED_PATH = Path(__file__).resolve().with_name("baselines_tuned.json")
TUNING_DATASET = "real/insta-smfish"


# --------------------------------------------------------------------------
# helpers


def percentile_rescale(image: np.ndarray, lo: float = 1.0, hi: float = 99.8) -> np.ndarray:
    """Map the ``lo``-th percentile of an image to 0 and the ``hi``-th to 1.

    Values outside are not clipped, so bright spots keep their contrast.

    Parameters
    ----------
    image : np.ndarray
        2D image, any real dtype.
    lo, hi : float
        Percentiles mapped to 0 and 1.

    Returns
    -------
    np.ndarray
        float32 image.
    """
    img = np.asarray(image, dtype=np.float32)
    p_lo, p_hi = np.percentile(img, [lo, hi])
    return (img - p_lo) / max(float(p_hi - p_lo), 1e-12)


def _as_coords(points) -> np.ndarray:
    pts = np.asarray(points, dtype=float)
    if pts.size == 0:
        return np.zeros((0, 2))
    return pts[:, :2].reshape(-1, 2)


def _parabolic_offsets(response: np.ndarray, peaks: np.ndarray) -> np.ndarray:
    """Sub-pixel offsets of peaks from a 3-point parabola along each axis."""
    offsets = np.zeros(peaks.shape, dtype=float)
    h, w = response.shape
    y, x = peaks[:, 0], peaks[:, 1]
    inner = (y > 0) & (y < h - 1) & (x > 0) & (x < w - 1)
    y, x = y[inner], x[inner]
    c = response[y, x]
    for axis, (m, p) in enumerate(
        [(response[y - 1, x], response[y + 1, x]), (response[y, x - 1], response[y, x + 1])]
    ):
        denom = m - 2.0 * c + p
        with np.errstate(divide="ignore", invalid="ignore"):
            off = np.where(denom < 0, 0.5 * (m - p) / denom, 0.0)
        offsets[inner, axis] = np.clip(off, -0.5, 0.5)
    return offsets


# --------------------------------------------------------------------------
# the detectors


def log_local_max(
    image: np.ndarray,
    sigma: float = 1.5,
    threshold_mad: float = 5.0,
    subpixel: bool = True,
) -> np.ndarray:
    """Detect spots with a simple reference: LoG, 3x3 local maxima, MAD threshold.

    The image is rescaled to its 1st-99.8th percentile, filtered with a
    scale-normalised Laplacian of Gaussian (sign flipped, so spots are
    positive), and every 3x3 local maximum above ``median + threshold_mad *
    1.4826 * MAD`` of the filtered image is a spot, refined by a 3-point
    parabola along each axis.

    Parameters
    ----------
    image : np.ndarray
        2D image.
    sigma : float
        LoG sigma in pixels.
    threshold_mad : float
        Threshold in robust standard deviations (1.4826 MAD) above the median.
    subpixel : bool
        Refine positions with the parabola fit.

    Returns
    -------
    np.ndarray
        (N, 2) float (y, x).
    """
    img = percentile_rescale(image)
    resp = -ndi.gaussian_laplace(img, sigma) * sigma**2
    med = float(np.median(resp))
    mad = 1.4826 * float(np.median(np.abs(resp - med)))
    thr = med + threshold_mad * max(mad, 1e-12)
    peaks = np.argwhere((resp == ndi.maximum_filter(resp, size=3)) & (resp > thr))
    coords = peaks.astype(float)
    if subpixel and len(peaks):
        coords += _parabolic_offsets(resp, peaks)
    return _as_coords(coords)


def blob_log(
    image: np.ndarray,
    min_sigma: float = 1.0,
    max_sigma: float = 50.0,
    num_sigma: int = 10,
    threshold: float = 0.2,
    overlap: float = 0.5,
) -> np.ndarray:
    """Run scikit-image ``blob_log`` on the image rescaled to its 1st-99.8th percentile.

    Parameters
    ----------
    image : np.ndarray
        2D image.
    min_sigma, max_sigma, num_sigma, threshold, overlap
        Passed to :func:`skimage.feature.blob_log` (defaults as shipped).

    Returns
    -------
    np.ndarray
        (N, 2) float (y, x).
    """
    from skimage.feature import blob_log as _blob_log

    blobs = _blob_log(
        percentile_rescale(image),
        min_sigma=min_sigma,
        max_sigma=max_sigma,
        num_sigma=num_sigma,
        threshold=threshold,
        overlap=overlap,
    )
    return _as_coords(blobs)


def _bigfish_input(image: np.ndarray) -> np.ndarray:
    # Big-FISH works on uint8/uint16 (its LoG output is cast back to that
    # dtype) or float; give it the image as a user would, in its own dtype.
    img = np.asarray(image)
    if img.dtype in (np.uint8, np.uint16, np.float32, np.float64):
        return img
    return img.astype(np.float64)


def bigfish(
    image: np.ndarray,
    spot_radius: float = 150.0,
    voxel_size: float = 100.0,
    threshold: float | None = None,
    threshold_factor: float = 1.0,
    subpixel: bool = False,
) -> np.ndarray:
    """Detect spots with Big-FISH (LoG + local maxima), optionally ``fit_subpixel``.

    The same steps as ``bigfish.detection.detect_spots`` on one image, through
    Big-FISH's own public functions, so that the automatic (elbow) threshold
    can be scaled by ``threshold_factor`` without filtering twice. With the
    defaults the spot radius is 1.5 px (150 nm / 100 nm), which is also the LoG
    sigma and the local-maximum distance, and the threshold is the automatic
    one: exactly ``detect_spots(image, voxel_size=100, spot_radius=150)``.

    Parameters
    ----------
    image : np.ndarray
        2D image; uint8 and uint16 are passed as they are (Big-FISH casts its
        filtered image back to that dtype, so thresholds are in its units).
    spot_radius, voxel_size : float
        Spot radius and pixel size in nm; their ratio is the LoG sigma in px.
    threshold : float or None
        Absolute threshold on the filtered image; None: the automatic
        threshold times ``threshold_factor``, found anew on each image.
    threshold_factor : float
        Multiplies the automatic threshold (ignored with ``threshold``).
    subpixel : bool
        Refine each spot with Big-FISH's Gaussian fit.

    Returns
    -------
    np.ndarray
        (N, 2) float (y, x).
    """
    from bigfish.detection import (
        automated_threshold_setting,
        fit_subpixel,
        get_object_radius_pixel,
        local_maximum_detection,
        spots_thresholding,
    )
    from bigfish.stack import log_filter

    img = _bigfish_input(image)
    radius_px = get_object_radius_pixel(
        voxel_size_nm=float(voxel_size), object_radius_nm=float(spot_radius), ndim=img.ndim
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        filtered = log_filter(img, radius_px)
        mask = local_maximum_detection(filtered, radius_px)
        if threshold is None:
            auto = automated_threshold_setting(filtered, mask)
            if auto is None:
                return np.zeros((0, 2))
            threshold = float(auto) * threshold_factor
        spots, _ = spots_thresholding(filtered, mask, float(threshold), remove_duplicate=True)
        if subpixel and len(spots):
            spots = fit_subpixel(img, spots, float(voxel_size), float(spot_radius))
    return _as_coords(spots)


def trackpy_locate(
    image: np.ndarray,
    diameter: int = 5,
    minmass: float | None = None,
    separation: float | None = None,
    percentile: float = 64.0,
) -> np.ndarray:
    """Run trackpy ``locate`` on the image rescaled to its 1st-99.8th percentile.

    Parameters
    ----------
    image : np.ndarray
        2D image.
    diameter : int
        Odd feature diameter in px.
    minmass, separation, percentile
        Passed to :func:`trackpy.locate` (defaults as shipped).

    Returns
    -------
    np.ndarray
        (N, 2) float (y, x).
    """
    import trackpy

    trackpy.quiet()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = trackpy.locate(
            percentile_rescale(image),
            int(diameter),
            minmass=minmass,
            separation=separation,
            percentile=percentile,
        )
    if len(df) == 0:
        return np.zeros((0, 2))
    return _as_coords(df[["y", "x"]].to_numpy())


@lru_cache(maxsize=1)
def _ufish_model():
    from loguru import logger as ufish_logger

    ufish_logger.disable("ufish")
    from ufish.api import UFish

    model = UFish(cuda=False)
    model.load_weights()  # the ONNX model shipped inside the wheel
    return model


def ufish(image: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Detect spots with U-FISH and the ONNX model shipped in its wheel, on CPU.

    U-FISH enhances the image with its network and calls spots as the local
    maxima of the Laplacian of the enhanced image above ``threshold``
    (``intensity_threshold``, 0.5 by default).

    Parameters
    ----------
    image : np.ndarray
        2D image (U-FISH rescales it to 0-255 itself).
    threshold : float
        ``intensity_threshold`` of U-FISH's local-maxima spot calling.

    Returns
    -------
    np.ndarray
        (N, 2) float (y, x).
    """
    df, _ = _ufish_model().predict(
        np.asarray(image, dtype=np.float32), axes="yx", intensity_threshold=float(threshold)
    )
    if len(df) == 0:
        return np.zeros((0, 2))
    return _as_coords(df[["axis-0", "axis-1"]].to_numpy())


# --------------------------------------------------------------------------
# registry


def _grid(**axes) -> list[dict]:
    keys = list(axes)
    grid = [{}]
    for k in keys:
        grid = [{**g, k: v} for g in grid for v in axes[k]]
    return grid


def _bigfish_grid(image: np.ndarray) -> list[dict]:
    """Spot radius 1, 1.5, 2 px x 10 factors on the automatic threshold (30 settings).

    The factor, not an absolute threshold, is what is kept: Big-FISH's
    threshold is in units of the image's dtype (uint8 smFISH, uint16 ISS), so
    one absolute value cannot serve images of different dtypes.
    """
    return _grid(
        spot_radius=[100.0, 150.0, 200.0],
        voxel_size=[100.0],
        threshold_factor=[0.5, 0.7, 0.85, 1.0, 1.2, 1.4, 1.7, 2.0, 2.5, 3.0],
    )


@dataclass(frozen=True)
class Baseline:
    """One baseline tool: its function, default parameters and tuning grid.

    Attributes
    ----------
    key : str
        Short name used on the command line.
    label : str
        Name in the results table.
    fn : callable
        ``fn(image, **params) -> (N, 2) coords``.
    defaults : dict
        The tool's parameters as shipped (or as a user would set them a priori).
    grid : callable or None
        ``grid(tuning_image) -> list of parameter dicts`` for :func:`tune`.
    requires : tuple of str
        Modules that must be importable.
    tuned_from : str or None
        Take the dev-tuned parameters from this key (plus ``extra``).
    extra : dict
        Parameters added to both settings (e.g. ``subpixel=True``).
    """

    key: str
    label: str
    fn: Callable[..., np.ndarray]
    defaults: dict
    grid: Callable[[np.ndarray], list[dict]] | None = None
    requires: tuple[str, ...] = ()
    tuned_from: str | None = None
    extra: dict = field(default_factory=dict)

    def params(self, setting: str, tuned: dict | None = None) -> dict | None:
        """Parameters of ``setting`` ('default' or 'tuned'); None if not tuned yet."""
        if setting == "default":
            return {**self.defaults, **self.extra}
        tuned = load_tuned() if tuned is None else tuned
        entry = tuned.get(self.tuned_from or self.key)
        if entry is None:
            return None
        tuned_params = entry["params"]
        ordered = {k: tuned_params[k] for k in self.defaults if k in tuned_params}
        return {**ordered, **tuned_params, **self.extra}


BASELINES: dict[str, Baseline] = {
    b.key: b
    for b in [
        Baseline(
            "log",
            "LoG + local maxima (reference)",
            log_local_max,
            {"sigma": 1.5, "threshold_mad": 5.0},
            lambda image: _grid(
                sigma=[1.0, 1.5, 2.0],
                threshold_mad=[2, 3, 4, 5, 6, 8, 10, 12, 14, 16, 18, 20, 25, 30],
            ),
        ),
        Baseline(
            "blob_log",
            "skimage blob_log",
            blob_log,
            {"min_sigma": 1.0, "max_sigma": 50.0, "num_sigma": 10, "threshold": 0.2},
            lambda image: _grid(
                min_sigma=[1.0],
                max_sigma=[3.0, 5.0, 50.0],
                num_sigma=[10],
                threshold=[0.02, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4],
            ),
        ),
        Baseline(
            "bigfish",
            "Big-FISH",
            bigfish,
            {"spot_radius": 150.0, "voxel_size": 100.0, "threshold": None},
            _bigfish_grid,
            requires=("bigfish",),
        ),
        Baseline(
            "bigfish_subpixel",
            "Big-FISH + fit_subpixel",
            bigfish,
            {"spot_radius": 150.0, "voxel_size": 100.0, "threshold": None},
            requires=("bigfish",),
            tuned_from="bigfish",
            extra={"subpixel": True},
        ),
        Baseline(
            "trackpy",
            "trackpy locate",
            trackpy_locate,
            {"diameter": 5, "minmass": None},
            lambda image: _grid(
                diameter=[3, 5, 7],
                minmass=[0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0, 1.5, 2.0, 3.0],
            ),
            requires=("trackpy",),
        ),
        Baseline(
            "ufish",
            "U-FISH pretrained",
            ufish,
            {"threshold": 0.5},
            lambda image: _grid(
                threshold=[round(0.05 * i, 2) for i in range(1, 21)] + [1.1, 1.25, 1.5, 1.75, 2.0]
            ),
            requires=("ufish", "onnxruntime", "loguru"),
        ),
    ]
}


def available(key: str) -> tuple[bool, str]:
    """Whether baseline ``key`` can run here, and why not.

    Parameters
    ----------
    key : str
        A key of :data:`BASELINES`.

    Returns
    -------
    ok : bool
    reason : str
        Empty when ``ok``; else the missing modules.
    """
    missing = [m for m in BASELINES[key].requires if importlib.util.find_spec(m) is None]
    if missing:
        return False, "not installed: " + ", ".join(missing)
    return True, ""


# --------------------------------------------------------------------------
# dev tuning


def load_tuned(path: Path = TUNED_PATH) -> dict:
    """Read the dev-tuned settings stored by :func:`tune` (empty if none)."""
    path = Path(path)
    if not path.exists():
        return {}
    return json.loads(path.read_text())


def _jsonable(params: dict) -> dict:
    out = {}
    for k, v in params.items():
        if isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def tune(
    image: np.ndarray,
    truth: np.ndarray,
    keys: list[str] | None = None,
    path: Path = TUNED_PATH,
) -> dict:
    """Grid-search each baseline on one annotated image and store the best settings.

    The objective is the integrated F1 (ties broken by F1 at 3 px). The
    result for each tool is written into the JSON file at ``path`` (other
    tools' entries are kept).

    Parameters
    ----------
    image : np.ndarray
        The tuning image (``real/insta-smfish``).
    truth : np.ndarray
        (M, 2) true spot positions.
    keys : list of str, optional
        Baselines to tune (default: every one that has a grid and can run).
    path : Path
        JSON file to update.

    Returns
    -------
    dict
        The updated content of the JSON file.
    """
    from piscis.metrics import f1_at, integrated_f1

    tuned = load_tuned(path)
    keys = [k for k in (keys or BASELINES) if BASELINES[k].grid is not None]
    for key in keys:
        ok, why = available(key)
        if not ok:
            logger.warning("not tuning %s: %s", key, why)
            continue
        b = BASELINES[key]
        grid = b.grid(image)
        best = None
        for params in grid:
            pred = b.fn(image, **params)
            val = (integrated_f1(pred, truth), f1_at(pred, truth, 3.0))
            logger.debug("%s %s -> f1_int %.3f f1@3 %.3f", key, params, *val)
            if best is None or val > best[0]:
                best = (val, params)
        (f1i, f13), params = best
        logger.info(
            "%s: best of %d settings %s (f1_int %.3f, f1@3 %.3f)", key, len(grid), params, f1i, f13
        )
        tuned[key] = {
            "params": _jsonable(params),
            "f1_int": round(f1i, 4),
            "f1_3": round(f13, 4),
            "n_settings": len(grid),
        }
    tuned["_meta"] = {
        "dataset": TUNING_DATASET,
        "objective": "integrated F1, ties by F1@3px",
        "note": "written by scripts/baselines.py tune(); re-run with benchmark.py --retune",
    }
    path.write_text(json.dumps(tuned, indent=2, sort_keys=True) + "\n")
    return tuned


# --------------------------------------------------------------------------
# one run in a fresh process (peak-memory measurement)


def run_file(key: str, setting: str, image_path: Path, out_csv: Path) -> int:
    """Read a TIFF, detect spots with one baseline setting, write a ``y,x`` CSV.

    Returns
    -------
    int
        Number of spots.
    """
    import tifffile

    b = BASELINES[key]
    params = b.params(setting)
    if params is None:
        raise RuntimeError(f"{key} has no dev-tuned setting yet")
    image = tifffile.imread(image_path)
    coords = b.fn(image, **params)
    np.savetxt(out_csv, coords, delimiter=",", header="y,x", comments="", fmt="%.3f")
    return len(coords)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``run KEY {default,tuned} IMAGE.tif OUT.csv``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="detect spots in one TIFF")
    run.add_argument("key", choices=sorted(BASELINES))
    run.add_argument("setting", choices=["default", "tuned"])
    run.add_argument("image", type=Path)
    run.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    n = run_file(args.key, args.setting, args.image, args.out)
    print(n)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
