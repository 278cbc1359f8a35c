"""Where every pipeline file lives, built from the repository root in one place.

The ``cxr`` command, the DVC stages (through the registry in :mod:`cxr.stages`) and the Prefect
tasks all name files through a :class:`Workspace`, so a path is spelled once. ``relative`` paths
(the default) are what ``dvc.yaml`` and the model cards record; ``Workspace(root)`` resolves them
against another checkout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Workspace:
    """The pipeline's folders and files under ``root``.

    Args:
        root: the repository root (the folder holding ``params.yaml`` and ``dvc.yaml``);
            ``Path(".")`` keeps every path relative, as DVC and the model cards record them.
    """

    root: Path = Path(".")

    def _p(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    # inputs and configuration
    @property
    def params(self) -> Path:
        return self._p("params.yaml")

    @property
    def dvc_yaml(self) -> Path:
        return self._p("dvc.yaml")

    # fetch
    @property
    def raw(self) -> Path:
        return self._p("data", "raw")

    @property
    def fetch_record(self) -> Path:
        return self._p("data", "fetch.json")

    # prepare
    @property
    def downloads(self) -> Path:
        """Downloads kept between runs (Kaggle zips, MedMNIST ``.npz``)."""
        return self._p("data", ".cache")

    @property
    def prepared(self) -> Path:
        return self._p("data", "prepared")

    @property
    def manifest(self) -> Path:
        return self.prepared / "manifest.csv"

    @property
    def splits(self) -> Path:
        return self.prepared / "splits.csv"

    @property
    def quality(self) -> Path:
        return self.reports / "data_quality.json"

    @property
    def external(self) -> Path:
        return self._p("data", "external")

    def external_index(self, name: str) -> Path:
        """The index CSV of external set ``name``."""
        return self.external / f"{name}.csv"

    # training
    @property
    def models(self) -> Path:
        return self._p("models")

    def model(self, name: str) -> Path:
        """``models/<name>.keras``."""
        return self.models / f"{name}.keras"

    def card(self, name: str) -> Path:
        """``models/<name>.card.json``, the model card shipped beside the model."""
        return self.models / f"{name}.card.json"

    @property
    def exports(self) -> Path:
        return self._p("exports")

    @property
    def ensemble(self) -> Path:
        return self._p("ensemble")

    @property
    def ensemble_model(self) -> Path:
        return self.ensemble / "ensemble.keras"

    @property
    def ensemble_record(self) -> Path:
        return self.ensemble / "ensemble.json"

    # reports
    @property
    def reports(self) -> Path:
        return self._p("reports")

    @property
    def plots(self) -> Path:
        return self.reports / "plots"

    @property
    def preview_plot(self) -> Path:
        return self.plots / "augmented_batch.png"

    @property
    def class_plot(self) -> Path:
        return self.plots / "class_distribution.png"

    @property
    def train_reports_root(self) -> Path:
        return self.reports / "train"

    @property
    def logs(self) -> Path:
        """TensorBoard logs."""
        return self._p("logs")

    def train_reports(self, name: str) -> Path:
        """``reports/train/<name>/`` (history, curves, metrics)."""
        return self.reports / "train" / name

    @property
    def eval(self) -> Path:
        return self.reports / "eval"

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics.json"

    @property
    def gradcam(self) -> Path:
        return self.reports / "gradcam"

    @property
    def gradcam_summary(self) -> Path:
        return self.gradcam / "summary.json"

    @property
    def agreement(self) -> Path:
        return self.reports / "agreement.json"

    @property
    def report_html(self) -> Path:
        return self.reports / "report.html"

    @property
    def report_md(self) -> Path:
        return self.reports / "report.md"

    # provenance
    @property
    def registry(self) -> Path:
        """Every trained model version, by content (:mod:`cxr.provenance.model_store`)."""
        return self._p("registry")

    @property
    def lineage_log(self) -> Path:
        return self._p("lineage", "models.jsonl")

    @property
    def confirmation_log(self) -> Path:
        """When each confirmation set was first scored, and under which settings."""
        return self._p("lineage", "confirmation.jsonl")


HERE = Workspace()
