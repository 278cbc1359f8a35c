"""The shared layer below every pipeline step: what several steps need, owned once.

- ``images`` — decode caps and header checks of one file; ``preprocessing`` — file → (S, S, 3) uint8.
- ``layers`` — the custom Keras layers saved inside models.
- ``metrics`` — ROC/PR, bootstrap CIs; ``thresholds`` — the threshold rules and the one answer to
  "which threshold does this model file use, and why".
- ``model_card`` — the typed, versioned model card: one reader, one writer.
- ``plots`` — matplotlib figures (a leaf); ``intended_use`` — the intended-use text.
- ``domain`` — the content check shipped with each model (out-of-domain films get no verdict).

Nothing here imports a step (``data``, ``training``, ``inference``, ``evaluation``, ``reporting``,
``serving``); ``tests/test_layers.py`` keeps it so.
"""
