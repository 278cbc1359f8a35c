"""``cxr export``: ONNX, SavedModel and LiteRT copies of a shipped model, with its card, checked
against the Keras model; the ONNX one scored by onnxruntime in a process without cxr or TensorFlow.

The model is a cxrnet with a centre crop (Keras's ``CenterCrop``, which Keras's own ONNX export
traced in training mode), trained on the shared synthetic project so that its output varies with
the image. Histogram equalisation, the custom layer that did not export as it was, is checked on
the real external images on its own: on the synthetic project it makes every model collapse (the
classes differ only in brightness, which it removes by design).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.factories import REPO_ROOT, chdir, small_params
from tests.hostile.harness import assert_refused, run_cxr

EXTERNAL = REPO_ROOT.parent / "shared" / "data" / "chest_xray_224_external_val"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained project plus ``models/cxrnet.keras``: a 10 % centre crop, 64 px, eight epochs."""
    from cxr.config import parse_params
    from cxr.training.train import train

    root = tmp_path_factory.mktemp("export") / "project"
    shutil.copytree(trained, root)
    params = small_params()
    params["input"].update(center_crop=0.1, image_size=64)
    params["train"]["models"] = ["cxrnet"]
    params["train"]["cxrnet"] = {"epochs": 8, "learning_rate": 0.01, "widths": [8, 16, 16, 16], "dropout": 0.0}
    with chdir(root):
        train("cxrnet", parse_params(params))
    return root


_CLEAN_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnxruntime as ort

    folder, inputs = sys.argv[1], sys.argv[2]
    record = json.load(open(folder + "/export.json"))
    session = ort.InferenceSession(folder + "/" + record["file"], providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == record["input"]["name"]
    images = np.load(inputs)
    p = session.run(None, {record["input"]["name"]: images})[0].reshape(-1)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("cxr", "tensorflow", "keras"))
    print(json.dumps({"p": p.tolist(), "leaked": leaked}))
""")


# smallnet learned the synthetic classes (its probabilities spread widely); cxrnet, with batch
# normalisation after the crop, barely moves from its start in a few epochs on 40 images
SPREAD = {"smallnet": 1e-2, "cxrnet": 2e-4}


@pytest.mark.parametrize("name", list(SPREAD))
def test_onnx_export_matches_keras_on_the_external_set_in_a_process_without_cxr(
    project: Path, tmp_path: Path, name: str
) -> None:
    if not EXTERNAL.is_dir():
        pytest.skip(f"{EXTERNAL} is not here")
    outcome = run_cxr(["export", "--model", name, "--format", "onnx"], project)
    assert outcome.rc == 0, outcome.describe()
    folder = project / f"exports/{name}/onnx"
    record = json.loads((folder / "export.json").read_text())
    card = (project / f"models/{name}.card.json").read_bytes()
    assert (folder / f"{name}.card.json").read_bytes() == card  # the card travels byte for byte
    assert record["keras_model_sha256"] == json.loads(card)["model_sha256"]
    from cxr.inference.export import tree_sha256

    assert record["sha256"] == tree_sha256(folder / record["file"])
    assert record["parity"]["max_abs_diff"] <= 1e-4
    assert record["preprocessing"]["resize"]["size"] == [json.loads(card)["input"]["preprocessing"]["image_size"]] * 2

    # the Keras model's probabilities, on images decoded and resized by cxr's own pipeline
    from cxr.inference.loading import iter_images, load

    with chdir(project):
        lm = load(f"models/{name}.keras")
        files = sorted(p for p in EXTERNAL.rglob("*") if p.is_file())
        decoded = [image for _, image, error in iter_images(files, lm.input) if error is None]
        images = np.stack(decoded).astype(np.float32) / 255.0
        keras_p = np.asarray(lm.model.predict(images, verbose=0)).reshape(-1)
    inputs = tmp_path / "inputs.npy"
    np.save(inputs, images)

    proc = subprocess.run(
        [sys.executable, "-I", "-c", _CLEAN_SCRIPT, str(folder), str(inputs)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["leaked"] == []
    onnx_p = np.asarray(result["p"])
    assert len(onnx_p) == len(files) == 314
    assert keras_p.std() > SPREAD[name]  # the probabilities vary: the comparison means something
    assert float(np.max(np.abs(onnx_p - keras_p))) <= 1e-4


def test_histogram_equalisation_exports_to_onnx_with_parity_on_the_real_external_images(tmp_path: Path) -> None:
    if not EXTERNAL.is_dir():
        pytest.skip(f"{EXTERNAL} is not here")
    import keras
    from PIL import Image

    from cxr.common.layers import IntensityNormalization
    from cxr.inference.export import _convert

    files = sorted(p for p in EXTERNAL.rglob("*.jpeg"))[::8]
    images = np.stack([np.asarray(Image.open(f).convert("RGB").resize((128, 128))) for f in files]) / 255.0
    images = images.astype(np.float32)
    inputs = keras.Input((128, 128, 3), name="image")
    model = keras.Model(inputs, IntensityNormalization("equalize")(inputs))
    expected = model.predict(images, verbose=0)
    _convert(model, 128, "onnx", tmp_path / "equalize.onnx")
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "equalize.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: images})[0]
    assert not np.isnan(got).any()  # infinity in the graph once made every pixel NaN
    assert float(np.max(np.abs(got - expected))) <= 1e-5


@pytest.mark.parametrize("fmt", ["savedmodel", "litert"])
def test_savedmodel_and_litert_exports_carry_the_card_and_pass_their_parity_check(project: Path, fmt: str) -> None:
    outcome = run_cxr(["export", "--model", "cxrnet", "--format", fmt], project)
    assert outcome.rc == 0, outcome.describe()
    record = json.loads((project / "exports/cxrnet" / fmt / "export.json").read_text())
    assert record["format"] == fmt and record["parity"]["max_abs_diff"] <= 1e-4
    assert (project / "exports/cxrnet" / fmt / record["file"]).exists()
    index = json.loads((project / "exports/index.json").read_text())["exports"]
    assert {(row["model"], row["format"]) for row in index} >= {("cxrnet", fmt)}


def test_an_unverified_model_is_not_exported(project: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(project, root)
    with open(root / "models/cxrnet.keras", "ab") as handle:
        handle.write(b"appended")
    assert_refused(run_cxr(["export", "--model", "cxrnet", "--format", "onnx"], root), "unverified model")
    assert not (root / "exports/cxrnet/onnx").exists() or (root / "exports/cxrnet/onnx/export.json").is_file()


def test_a_keras_file_loads_in_plain_keras_after_one_import(tmp_path: Path) -> None:
    """The custom layers (equalisation, the default recipe's) are registered by ``import
    cxr.common.layers``; without it Keras names the class it cannot find."""
    import keras

    from cxr.common.layers import IntensityNormalization

    inputs = keras.Input((32, 32, 3), name="image")
    x = IntensityNormalization("equalize", name="normalize")(inputs)
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(x))
    path = tmp_path / "equalized.keras"
    keras.Model(inputs, outputs, name="equalized").save(path)
    script = textwrap.dedent("""
        import sys, keras
        path = sys.argv[1]
        try:
            keras.saving.load_model(path)
        except Exception as exc:
            print("without:", type(exc).__name__, "IntensityNormalization" in str(exc))
        import cxr.common.layers  # noqa: F401
        model = keras.saving.load_model(path)
        print("with:", model.name)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "without: TypeError True" in proc.stdout and "with: equalized" in proc.stdout
