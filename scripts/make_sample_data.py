"""Write the generated sample images (with their true spots) into sample_data/.

python scripts/make_sample_data.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from piscis.data import visible_spots  # noqa: E402
from piscis.detect import estimate_normalization  # noqa: E402
from piscis.io import table_text  # noqa: E402
from piscis.synth import SynthConfig, generate_spots, spot_image  # noqa: E402


def _visible(generated):
    image, spots = generated
    return image, visible_spots(spots, estimate_normalization(image))


def main() -> None:
    out = ROOT / "sample_data"
    out.mkdir(exist_ok=True)
    rng = np.random.default_rng(2024)
    images = {
        # 60 spots (sigma 1, amp 400) on background 100 with read noise sd 5.
        "synthetic_simple": spot_image(rng, (512, 512), n_spots=60),
        # The generator's realistic mix: cells, haze, specks, 16-bit.
        "synthetic_cells": _visible(
            generate_spots(
                rng,
                SynthConfig(
                    shape=(512, 512), empty_fraction=0.0, cell_fraction=1.0, eight_bit_fraction=0.0
                ),
            )
        ),
        # A spot-free field: the right answer is 0.
        "synthetic_blank": (
            np.clip(rng.poisson(100, (512, 512)) + rng.normal(0, 5, (512, 512)), 0, 65535).astype(
                np.uint16
            ),
            np.zeros((0, 2)),
        ),
    }
    for name, (img, coords) in images.items():
        tifffile.imwrite(out / f"{name}.tif", img)
        (out / f"{name}.truth.csv").write_text(table_text({"y": coords[:, 0], "x": coords[:, 1]}))
        print(f"{name}: {img.shape} {img.dtype}, {len(coords)} spots")


if __name__ == "__main__":
    main()
