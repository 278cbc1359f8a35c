"""Data: where the images come from and how they become an audited manifest and split.

- ``fetch`` — one entry point for every source (``kaggle``, ``dir``, ``medmnist``), atomic and resumable;
  ``kaggle``, ``medmnist`` and ``archive`` implement the sources, ``kaggle_layout`` reads the folder shape.
- ``dir_copy`` — the ``dir`` source's copy; ``links`` — which symbolic links a folder may follow;
  ``staging`` — download/unpack folders; ``sample`` — the embedded demo sample.
- ``manifest`` — one row per usable image, with patient ids; ``pairing`` — identical bytes across files.
- ``split`` — the patient-grouped, leakage-audited train/validation/test split.
- ``prepare`` — the step: manifest + split + data-quality report.
- ``external_sets`` — index of labelled outside folders scored by every model; ``drift`` — how new
  data differs from the data the shipped model was trained on.
"""
