"""How well the content check separates chest films from everything else, for one trained model.

    python benchmarks/domain_check.py --workspace /tmp/exp --model /tmp/exp/recipes/baseline/models/cxrnet.keras \\
        --external ../shared/data/chest_xray_224_external_val

Fits the check exactly as training does (:func:`cxr.common.domain.fit_domain`: the train split's
penultimate features, the threshold at the validation split's ``--percentile``), then reports the
share kept in domain of the validation split, of ``--external`` (real films from outside the
training data) and of the workspace's test split, and the share flagged of: a corpus of non-chest
images that scikit-image and scikit-learn ship as sample data (photographs, microscopy, astronomy,
text: made by nobody here), and the external films turned upside down, rotated 90° and inverted
(a MONOCHROME1 film read the wrong way). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def sample_corpus() -> list[Path]:
    """The JPEG and PNG sample images bundled with scikit-image and scikit-learn (none is a chest film)."""
    found: list[Path] = []
    try:
        import skimage.data

        found += sorted(p for p in Path(skimage.data.data_dir).iterdir() if p.suffix.lower() in (".png", ".jpg"))
    except ImportError:
        pass
    import sklearn.datasets

    images = Path(sklearn.datasets.__file__).parent / "images"
    found += sorted(images.glob("*.jpg"))
    return found


def main(argv: list[str] | None = None) -> int:
    from cxr.common.domain import features_and_probabilities, fit_domain, scoring_model
    from cxr.evaluation.evaluate import labelled_folder
    from cxr.inference.loading import iter_images, load
    from cxr.training.input_pipeline import load_images, read_split

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, required=True, help="folder with data/prepared/splits.csv")
    parser.add_argument("--model", type=Path, required=True, help="a trained .keras model with its card")
    parser.add_argument("--external", type=Path, required=True, help="labelled chest films from outside")
    parser.add_argument("--percentile", type=float, default=99.5)
    args = parser.parse_args(argv)
    args.model, args.external = args.model.resolve(), args.external.resolve()
    os.chdir(args.workspace)  # splits.csv names its images relative to the workspace
    args.workspace = Path(".")

    lm = load(args.model, allow_unverified=True)
    scorer = scoring_model(lm.model)
    cfg = lm.cached_input(str(args.workspace / "data/cache"))
    splits = args.workspace / "data/prepared/splits.csv"
    features = {}
    for split in ("train", "val", "test"):
        paths, _, key = read_split(splits, split)
        features[split] = features_and_probabilities(scorer, load_images(paths, key, cfg, split))[0] if paths else None
    domain = fit_domain(features["train"], features["val"], args.percentile)

    def share(split: str) -> float | None:
        feats = features[split]
        return None if feats is None else round(float(np.mean(domain.scores(feats) <= 1.0)), 4)

    def kept(images: np.ndarray) -> float:
        return float(np.mean(domain.scores(features_and_probabilities(scorer, images)[0]) <= 1.0))

    files, _, _ = labelled_folder(args.external.resolve())
    films = np.stack([img for _, img, err in iter_images(files, lm.input) if err is None])
    corpus_files = sample_corpus()
    corpus = np.stack([img for _, img, err in iter_images(corpus_files, lm.input) if err is None])
    result = {
        "model": str(args.model),
        "percentile": args.percentile,
        "threshold": round(domain.threshold, 4),
        "dimensions": int(domain.mean.size),
        "in_domain": {
            "val": round(float(np.mean(domain.scores(features["val"]) <= 1.0)), 4),
            "test": None
            if features["test"] is None
            else round(float(np.mean(domain.scores(features["test"]) <= 1.0)), 4),
            "external": round(kept(films), 4),
        },
        "n": {"external": len(films), "corpus": len(corpus)},
        "flagged": {
            "non_chest_corpus": round(1 - kept(corpus), 4),
            "upside_down": round(1 - kept(films[:, ::-1]), 4),
            "rotated_90": round(1 - kept(np.rot90(films, axes=(1, 2)).copy()), 4),
            "inverted": round(1 - kept(255 - films), 4),
        },
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
