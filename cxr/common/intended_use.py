"""Intended use and limitations of the models: one text, shown in the report and written into every
model card (and so served with the model).

The models learn from the Kermany, Zhang & Goldbaum chest X-ray set: paediatric films from one
hospital. Whatever the pipeline measures on its held-out split says nothing about adults, other
hospitals' machines and protocols, or other views; the text below says so wherever a model or its
figures are shown.
"""

from __future__ import annotations

from typing import Any

DATA_CITATION = "Kermany, Zhang & Goldbaum (2018), doi:10.17632/rscbjbr9sj.2, CC BY 4.0"

INTENDED_USE = (
    "Research on pneumonia classification from paediatric chest X-rays: anterior–posterior chest films "
    "of children aged one to five, of the kind collected at one centre (Guangzhou Women and Children's "
    "Medical Center, Guangzhou, China)."
)

LIMITATIONS = (
    "Trained and tested on paediatric anterior–posterior chest films from a single centre (Guangzhou).",
    "Not validated on adults, on other views (posterior–anterior, lateral) or on other hospitals' images, "
    "scanners and protocols: expect lower and differently calibrated figures there.",
    "The decision threshold was chosen on data from the same centre; it may not transfer.",
    "Not a medical device: research use only, not for diagnosis or treatment decisions.",
)

# one line, where a model is named without its card (dvc.yaml's artifacts)
SHORT = (
    "for paediatric anterior–posterior chest films from one centre (Guangzhou); research use only, not a medical device"
)


def intended_use() -> dict[str, Any]:
    """The intended-use record of a model card (``card["intended_use"]``).

    Returns:
        ``{"intended_use", "population", "view", "centre", "limitations", "medical_device",
        "research_use_only", "training_data"}``: plain JSON values.
    """
    return {
        "intended_use": INTENDED_USE,
        "population": "children aged 1–5",
        "view": "anterior–posterior (AP) chest radiograph",
        "centre": "Guangzhou Women and Children's Medical Center, Guangzhou, China (one centre)",
        "limitations": list(LIMITATIONS),
        "medical_device": False,
        "research_use_only": True,
        "training_data": DATA_CITATION,
    }
