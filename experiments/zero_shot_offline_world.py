"""Zero-shot accuracy of MiniCLIP on every offline dataset (test split, dataset template).

    PYTHONPATH=. python experiments/zero_shot_offline_world.py [--root DIR] [--weights FILE]

miniworld-like datasets are also scored as CoOp's base-to-new split: base = the first
ceil(C/2) labels, new = the rest, each classified among its own classes only.
"""

import argparse
import json
import math
from pathlib import Path

import numpy as np
import open_clip

from bayesprompt.clip.miniclip import (
    MODEL_NAME,
    ensure_miniclip,
    register_miniclip,
    zero_shot_accuracy,
)
from bayesprompt.paths import data_root
from bayesprompt.world.downstream import (
    DATASETS,
    read_split,
    write_offline_dataset,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="offline data root")
    parser.add_argument("--weights", type=Path, default=None, help="MiniCLIP weights file")
    args = parser.parse_args()
    register_miniclip()
    weights = args.weights or ensure_miniclip()
    model = open_clip.create_model(MODEL_NAME, pretrained=str(weights)).eval()
    tokenizer = open_clip.get_tokenizer(MODEL_NAME)
    print(f"data root: {args.root or data_root()}")
    print(f"{'dataset':20s} {'classes':>7s} {'all':>6s} {'base':>6s} {'new':>6s}")
    for name in DATASETS:
        folder = write_offline_dataset(name, args.root)
        meta = json.loads((folder / "dataset.json").read_text())
        images, labels = read_split(folder, "test")
        names, template = meta["classnames"], meta["template"]
        n_base = math.ceil(len(names) / 2)
        scores = [zero_shot_accuracy(model, tokenizer, images, labels, names, template)]
        for half in (np.arange(n_base), np.arange(n_base, len(names))):
            keep = np.isin(labels, half)
            scores.append(
                zero_shot_accuracy(
                    model,
                    tokenizer,
                    images[keep],
                    labels[keep] - half[0],
                    [names[k] for k in half],
                    template,
                )
            )
        print(f"{name:20s} {len(names):7d} " + " ".join(f"{s:6.3f}" for s in scores))


if __name__ == "__main__":
    main()
