"""Build the embedded demo sample ``cxr/data/sample_data/`` from the official Kaggle *train* split at 224 px.

Usage (from the repository root)::

    python tools/make_sample.py --src ../shared/data/chest_xray_224/train

The sample is what ``data.source: auto`` falls back to on a machine without Kaggle credentials,
so that ``dvc repro`` runs the whole pipeline out of the box. It is:

- **patient-grouped**: whole patients are taken (every one of their images), with the patient id
  read from the file name exactly as the pipeline reads it (:func:`cxr.data.manifest.parse_patient`);
- **stratified**: each stratum (NORMAL; PNEUMONIA patients with only ``bacteria``, only ``virus``, or
  both kinds of file names) gets its share of the images of the full split, to within one patient;
- **free of duplicates**: patients with a file whose bytes occur twice in the full split are skipped;
- **deterministic**: patients are visited in an order seeded by ``--seed``, files are copied byte for
  byte (no re-encoding: they are already 224 px JPEGs of ~7 KB), and every text file is generated,
  so a rebuild from the same source gives the same bytes (``--check`` verifies that).

Besides the class folders it writes ``MANIFEST.csv`` (file, patient, subtype, sha256, bytes),
``README.md`` (composition, provenance, citation) and ``LICENSE`` (CC BY 4.0 notice).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import random
import shutil
import sys
import tempfile
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cxr.data.manifest import parse_patient  # noqa: E402  (the pipeline's own patient parser)

DEFAULT_SRC = REPO.parent / "shared" / "data" / "chest_xray_224" / "train"
DEFAULT_OUT = REPO / "cxr" / "data" / "sample_data"
CLASSES = ("NORMAL", "PNEUMONIA")
IMAGE_SIZE = 224
MAX_BYTES = 5_000_000

CITATION = (
    "Kermany, D., Zhang, K., Goldbaum, M. (2018). Labeled Optical Coherence Tomography (OCT) and Chest "
    "X-Ray Images for Classification. Mendeley Data, v2. https://doi.org/10.17632/rscbjbr9sj.2"
)
PAPER = (
    "Kermany, D. S., Goldbaum, M., Cai, W., et al. (2018). Identifying Medical Diagnoses and Treatable "
    "Diseases by Image-Based Deep Learning. Cell 172(5), 1122-1131.e9. https://doi.org/10.1016/j.cell.2018.02.010"
)

LICENSE_TEXT = f"""\
The images in this folder (NORMAL/ and PNEUMONIA/) are a subset of:

  {CITATION}

licensed under the Creative Commons Attribution 4.0 International licence (CC BY 4.0):
https://creativecommons.org/licenses/by/4.0/ (legal code:
https://creativecommons.org/licenses/by/4.0/legalcode).

Changes: a subset of the official "train" split was selected (see README.md and MANIFEST.csv);
every image had been resized to 224 x 224 pixels and re-compressed as JPEG by a third party
before it was selected here. The files are otherwise unchanged.

Please also cite:

  {PAPER}

The rest of this repository is licensed separately (see pyproject.toml); this notice covers only
the files of this folder.
"""


@dataclass(frozen=True)
class Patient:
    class_name: str
    patient_id: str
    stratum: str  # NORMAL, PNEUMONIA/bacteria, PNEUMONIA/virus, PNEUMONIA/bacteria+virus
    files: tuple[Path, ...]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def patients(src: Path) -> list[Patient]:
    """Every patient of ``src/{NORMAL,PNEUMONIA}`` with a known id and no duplicated bytes, sorted."""
    files: dict[tuple[str, str], list[Path]] = defaultdict(list)
    subtypes: dict[tuple[str, str], set[str]] = defaultdict(set)
    digests: Counter[str] = Counter()
    digest_of: dict[Path, str] = {}
    for class_name in CLASSES:
        for path in sorted((src / class_name).iterdir()):
            if not path.is_file() or path.name.startswith("."):
                continue
            patient_id, subtype = parse_patient(path.name)
            if not patient_id:
                continue
            digest_of[path] = _sha256(path)
            digests[digest_of[path]] += 1
            files[(class_name, patient_id)].append(path)
            if subtype:
                subtypes[(class_name, patient_id)].add(subtype)
    out = []
    for (class_name, patient_id), paths in sorted(files.items()):
        if any(digests[digest_of[p]] > 1 for p in paths):
            continue  # keep the sample free of byte-identical duplicates
        kinds = "+".join(sorted(subtypes[(class_name, patient_id)]))
        stratum = f"{class_name}/{kinds}" if kinds else class_name
        out.append(Patient(class_name, patient_id, stratum, tuple(sorted(paths))))
    return out


def select(all_patients: list[Patient], n_images: int, seed: int) -> list[Patient]:
    """Whole patients, each stratum filled to its share of ``n_images`` in a seeded order."""
    by_stratum: dict[str, list[Patient]] = defaultdict(list)
    for patient in all_patients:
        by_stratum[patient.stratum].append(patient)
    total = sum(len(p.files) for p in all_patients)
    rng = random.Random(seed)
    chosen: list[Patient] = []
    for stratum in sorted(by_stratum):
        group = by_stratum[stratum]
        target = round(n_images * sum(len(p.files) for p in group) / total)
        taken = 0
        for patient in rng.sample(group, len(group)):
            if taken >= target:
                break
            if taken + len(patient.files) <= target:
                chosen.append(patient)
                taken += len(patient.files)
    return sorted(chosen, key=lambda p: (p.class_name, p.patient_id))


def _check_image(path: Path) -> None:
    with Image.open(path) as image:
        if image.format != "JPEG" or image.size != (IMAGE_SIZE, IMAGE_SIZE):
            raise SystemExit(f"{path}: {image.format} {image.size}, expected a {IMAGE_SIZE} px JPEG")
        image.load()


def _manifest(chosen: list[Patient]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "class_name", "patient_id", "subtype", "sha256", "bytes"])
    for patient in chosen:
        for path in patient.files:
            subtype = parse_patient(path.name)[1]
            rel = f"{patient.class_name}/{path.name}"
            writer.writerow([rel, patient.class_name, patient.patient_id, subtype, _sha256(path), path.stat().st_size])
    return buffer.getvalue()


def _readme(chosen: list[Patient], n_images: int, seed: int, src_name: str) -> str:
    rows = []
    for stratum in sorted({p.stratum for p in chosen}):
        group = [p for p in chosen if p.stratum == stratum]
        rows.append(f"| {stratum} | {len(group)} | {sum(len(p.files) for p in group)} |")
    images = sum(len(p.files) for p in chosen)
    size = sum(f.stat().st_size for p in chosen for f in p.files)
    lines = [
        "# Embedded demo sample (CC BY 4.0)",
        "",
        "A small, real subset of the chest X-ray data, shipped inside the `cxr` package so that the",
        "pipeline runs end to end on a machine without a Kaggle account (`data.source: auto` without",
        "credentials, or `data.source: sample`). Models trained on it are **demonstrations only**: their",
        "cards, lineage and report say `demo sample`. For the full data see the README's",
        '"Data sources" and "Kaggle credentials".',
        "",
        "Generated by `python tools/make_sample.py` (do not edit by hand; `--check` verifies a rebuild",
        f"gives the same bytes). Source: `{src_name}` (the official Kaggle *train* split, every image",
        "resized to 224 x 224 and re-compressed by a third party); files are copied byte for byte.",
        "",
        "Selection: whole patients (ids parsed from file names as the pipeline does), each stratum",
        f"filled to its share of {n_images} images, patients visited in an order seeded with {seed};",
        "patients with a byte-duplicated file are skipped.",
        "",
        "| stratum | patients | images |",
        "|---|---|---|",
        *rows,
        f"| **total** | {len(chosen)} | {images} ({size} bytes) |",
        "",
        "Every file is listed with its patient, subtype and sha256 in `MANIFEST.csv`.",
        "",
        "## Licence and citation",
        "",
        "CC BY 4.0 (see `LICENSE`). Cite:",
        "",
        f"- {CITATION}",
        f"- {PAPER}",
        "",
    ]
    return "\n".join(lines)


def build(src: Path, out: Path, n_images: int, seed: int) -> dict[str, int]:
    """Write the sample into ``out`` (replaced as a whole); return its counts."""
    chosen = select(patients(src), n_images, seed)
    staged = Path(tempfile.mkdtemp(prefix=".sample-", dir=out.parent))
    try:
        for patient in chosen:
            for path in patient.files:
                _check_image(path)
                target = staged / patient.class_name / path.name
                target.parent.mkdir(exist_ok=True)
                shutil.copyfile(path, target)
        (staged / "MANIFEST.csv").write_text(_manifest(chosen))
        (staged / "README.md").write_text(_readme(chosen, n_images, seed, src.parent.name + "/" + src.name))
        (staged / "LICENSE").write_text(LICENSE_TEXT)
        size = sum(p.stat().st_size for p in staged.rglob("*") if p.is_file())
        if size > MAX_BYTES:
            raise SystemExit(f"the sample holds {size} bytes, over {MAX_BYTES}: choose fewer --images")
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    counts = {c: sum(len(p.files) for p in chosen if p.class_name == c) for c in CLASSES}
    return {**counts, "patients": len(chosen), "bytes": size}


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="the 224 px train split (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the sample folder (default: %(default)s)")
    parser.add_argument("--images", type=int, default=360, help="images to select (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=20181122, help="patient order (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="rebuild in a temporary folder and compare with --out")
    args = parser.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            build(args.src, Path(tmp) / "sample", args.images, args.seed)
            same = _tree(Path(tmp) / "sample") == _tree(args.out)
        print("identical" if same else f"{args.out} differs from a rebuild")
        return 0 if same else 1
    counts = build(args.src, args.out, args.images, args.seed)
    print(" ".join(f"{k}={v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
