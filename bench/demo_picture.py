"""docs/images/demo_output.png from a finished `make demo` in this directory.

Rows: the first four validation images; columns: image, overlay written by the job, predicted
mask, ground truth (with its 255 "ignore" border). Tiles are upscaled 2x (nearest).

    python bench/demo_picture.py [--output outputs/demo] [--out docs/images/demo_output.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.data.manifest import read_manifest  # noqa: E402

GAP, ZOOM, ROWS = 8, 2, 4


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="outputs/demo")
    p.add_argument("--manifest", default="data/synthetic/manifests/val.parquet")
    p.add_argument("--out", default="docs/images/demo_output.png")
    args = p.parse_args(argv)
    rows = read_manifest(args.manifest).to_pylist()[:ROWS]
    tiles = []
    for row in rows:
        out = Path(args.output)
        tiles.append([Image.open(row["image_uri"]).convert("RGB"),
                      Image.open(out / "overlays" / f"{row['id']}.jpg").convert("RGB"),
                      Image.open(out / "masks" / f"{row['id']}.png").convert("RGB"),
                      Image.open(row["mask_uri"]).convert("RGB")])
    w, h = tiles[0][0].size
    canvas = Image.new("RGB", (4 * w * ZOOM + 3 * GAP, len(tiles) * h * ZOOM + (len(tiles) - 1) * GAP), "white")
    for r, line in enumerate(tiles):
        for c, tile in enumerate(line):
            canvas.paste(tile.resize((w * ZOOM, h * ZOOM), Image.NEAREST), (c * (w * ZOOM + GAP), r * (h * ZOOM + GAP)))
    canvas.save(args.out)
    print(f"wrote {args.out} ({np.array(canvas).shape[1]}x{np.array(canvas).shape[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
