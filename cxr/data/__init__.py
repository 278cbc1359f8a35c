"""Data: where the images come from and how they become an audited manifest and split.

- ``fetch`` — one entry point for every source (``kaggle``, ``dir``, ``medmnist``), atomic and resumable;
  ``kaggle``, ``medmnist`` and ``archive`` implement the sources, ``kaggle_layout`` reads the folder shape.
- ``images`` — decode checks of one file; ``manifest`` — one row per usable image, with patient ids.
- ``split`` — the patient-grouped, leakage-audited train/validation/test split.
- ``prepare`` — the step: manifest + split + data-quality report.
- ``external_sets`` — index of labelled outside folders scored by every model.
"""
