"""cxr: the domain library of the chest X-ray pneumonia pipeline.

Never imports Prefect or DVC: those live in ``tasks/`` and ``flows/`` and in ``dvc.yaml``.
"""

__version__ = "0.1.0"

CLASS_NAMES = ("NORMAL", "PNEUMONIA")  # index = label: 0 normal, 1 pneumonia
SPLITS = ("train", "val", "test")
