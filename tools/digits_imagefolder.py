"""Writes scikit-learn's digits (1,797 8x8 images) as an ImageFolder tree of 72 px RGB JPEGs,
ROOT/train/<class>/*.jpg (1,437) and ROOT/val/<class>/*.jpg (360), for trying
`dps-train --dataset imagefolder:ROOT` offline (the README's CPU throughput figure).

    python tools/digits_imagefolder.py /tmp/digits-folder
"""
import argparse
import os

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--size", type=int, default=72)
    ap.add_argument("--val", type=int, default=360, help="images held out for ROOT/val")
    args = ap.parse_args()
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    for k, i in enumerate(order):
        folder = os.path.join(args.root, "val" if k < args.val else "train", str(y[i]))
        os.makedirs(folder, exist_ok=True)
        img = Image.fromarray((x[i].reshape(8, 8) / 16 * 255).astype(np.uint8)).convert("RGB")
        img.resize((args.size, args.size), Image.BILINEAR).save(os.path.join(folder, f"{i}.jpg"), quality=90)
    print(f"{args.root}: {len(y) - args.val} train / {args.val} val images, 10 classes")


if __name__ == "__main__":
    main()
