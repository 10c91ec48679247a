"""Write a small, valid mosaic (with CHECKSUM/DATASUM) into a staging folder, once.

Used by `.ci/dev run` so a newcomer sees a product published within a minute,
and by benchmarks that need realistic FITS files.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from astropy.io import fits


def write_mosaic(path: Path, pixels: int = 256, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    data = rng.normal(0.0, 1e-4, size=(pixels, pixels)).astype(np.float32)
    hdu = fits.PrimaryHDU(data)
    header = hdu.header
    header["OBJECT"] = "DSA110_MOSAIC"
    header["BUNIT"] = "Jy/beam"
    header["DATE-OBS"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    header["CRVAL1"] = 180.0
    header["CRVAL2"] = 37.0
    header["NIMAGES"] = 10
    header["MEDRMS"] = 1e-4
    header["EFFNOISE"] = 3.2e-5
    header["COVERAGE"] = 0.97
    hdu.writeto(path, overwrite=True, checksum=True)
    return path


def main() -> int:
    """FOLDER [SEED]: the seed makes the pixels (two nodes' mosaics of one name differ)."""
    folder = Path(sys.argv[1])
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        return 0
    path = write_mosaic(folder / f"nightly_{time.strftime('%Y%m%d', time.gmtime())}.fits",
                        seed=seed)
    print(f"wrote a demo mosaic: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
