"""Export a shipped model to ONNX, a TensorFlow SavedModel or LiteRT, so that it runs where this
package is not installed: ``cxr export --model NAME --format onnx|savedmodel|litert``.

Which converter, and why (each found by the parity check below):

* **ONNX: tf2onnx**, called on a ``tf.function`` that calls the model with ``training=False``.
  Keras 3's own ``model.export(format="onnx")`` wraps the same tf2onnx but traced our cxrnet with its
  centre crop in training mode: batch normalisation used the batch's statistics, and
  probabilities differed by up to 0.47.
* **SavedModel: Keras's** ``keras.export.ExportArchive`` with the same explicit inference-mode
  endpoint (``serve``), and **LiteRT: TensorFlow's converter** on that SavedModel.
* Histogram equalisation (:class:`cxr.common.layers.IntensityNormalization`) filled empty levels
  with infinity, which ONNX Runtime computed into NaN; it now uses the largest float32, which gives
  the same minimum in Keras too.

What travels, in ``exports/<name>/<format>/``: the exported model; the card, byte for byte; and
``export.json`` with the export's own sha256, the Keras file it came from, the decision threshold
and its source, the preprocessing the graph expects (decode, resize and scale to [0, 1] are done
*before* the graph, as ``preprocessing`` says; intensity normalisation and the crop are inside),
the input and output names, the tool versions and the parity figure. Every export is compared
with the Keras model on probe images before it is written, and refused (nothing written) when any
probability differs by more than ``1e-4``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cxr.errors import CxrError
from cxr.files import write_json
from cxr.inference.loading import LoadedModel, load, model_file
from cxr.provenance.hashing import sha256_file
from cxr.runtime import native_stderr, tensorflow
from cxr.safe_text import printable
from cxr.workspace import HERE

log = logging.getLogger(__name__)

Format = Literal["onnx", "savedmodel", "litert"]
FORMATS: tuple[str, ...] = ("onnx", "savedmodel", "litert")
_SUFFIX = {"onnx": ".onnx", "savedmodel": ".savedmodel", "litert": ".tflite"}
PARITY_TOLERANCE = 1e-4
EXPORTS_DIR = HERE.exports


def float32_twin(model: Any) -> Any:
    """The model computing in float32 (the same weights): a model trained in mixed bfloat16 or float16
    has bf16/fp16 convolutions, which ONNX Runtime's CPU kernels do not run. The model itself when it
    already computes in float32."""
    import keras

    if all(getattr(layer.dtype_policy, "compute_dtype", "float32") == "float32" for layer in model.layers):
        return model

    def clone(layer: Any) -> Any:
        return layer.__class__.from_config({**layer.get_config(), "dtype": "float32"})

    twin = keras.models.clone_model(model, clone_function=clone)
    twin.set_weights(model.get_weights())
    return twin


def probe_images(size: int, count: int = 16, seed: int = 0) -> np.ndarray:
    """(count, size, size, 3) float32 in [0, 1]: noise, smooth gradients with blobs, and flat images."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    images = []
    for i in range(count):
        if i % 3 == 0:
            grey = rng.random((size, size))
        elif i % 3 == 1:
            cy, cx, r = rng.random(3) * [1, 1, 0.5] + [0, 0, 0.1]
            grey = 0.6 * ys + 0.3 * np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / r**2)
        else:
            grey = np.full((size, size), rng.random())
        images.append(np.repeat(np.clip(grey, 0, 1)[..., None], 3, axis=-1))
    return np.stack(images).astype(np.float32)


def _runner(fmt: str, path: Path) -> tuple[Any, tuple[str, str]]:
    """A function (N, S, S, 3) float32 → (N,) probabilities for the exported file, and the names of
    its input and output (as ``export.json`` records them)."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        names = (name, session.get_outputs()[0].name)
        return (lambda x: np.asarray(session.run(None, {name: x})[0]).reshape(-1)), names
    tf = tensorflow()
    if fmt == "savedmodel":
        loaded = tf.saved_model.load(str(path))
        return (lambda x: np.asarray(loaded.serve(tf.constant(x))).reshape(-1)), (
            "serve (positional input)",
            "output 0",
        )
    with warnings.catch_warnings():  # "tf.lite.Interpreter is deprecated": ai_edge_litert is not a dependency
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_path=str(path))

    def run(x: np.ndarray) -> np.ndarray:
        out = []
        for image in x:  # the converted graph has a fixed batch of one
            interpreter.resize_tensor_input(interpreter.get_input_details()[0]["index"], [1, *image.shape])
            interpreter.allocate_tensors()
            interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image[None])
            interpreter.invoke()
            out.append(float(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).reshape(-1)[0]))
        return np.asarray(out)

    return run, ("input 0", "output 0")


def _convert(model: Any, size: int, fmt: str, path: Path) -> None:
    """Write ``model`` in ``fmt`` to ``path``, always through an inference-mode (``training=False``) call."""
    tf = tensorflow()
    import keras

    spec = tf.TensorSpec((None, size, size, 3), tf.float32, name="image")
    if fmt == "onnx":
        from keras.src.export.onnx import patch_tf2onnx

        patch_tf2onnx()  # Keras's own fix-up of tf2onnx for numpy 2
        import tf2onnx

        infer = tf.function(lambda images: model(images, training=False), input_signature=[spec])
        tf2onnx.convert.from_function(infer, [spec], opset=17, output_path=str(path))
        return
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", lambda images: model(images, training=False), input_signature=[spec])
    if fmt == "savedmodel":
        archive.write_out(str(path), verbose=False)
        return
    saved = path.with_name(path.name + ".savedmodel")
    archive.write_out(str(saved), verbose=False)
    try:
        converter = tf.lite.TFLiteConverter.from_saved_model(str(saved), signature_keys=["serve"])
        path.write_bytes(converter.convert())
    finally:
        shutil.rmtree(saved, ignore_errors=True)


def tree_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder: of its files' relative paths and sha256s, sorted."""
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{item.relative_to(path).as_posix()}\0{sha256_file(item)}\n".encode())
    return digest.hexdigest()


def _versions(fmt: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = {"onnx": ("keras", "tensorflow", "tf2onnx", "onnx", "onnxruntime")}.get(fmt, ("keras", "tensorflow"))
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def export_model(
    model: str | Path, fmt: str = "onnx", out_dir: str | Path | None = None, exports_dir: Path = EXPORTS_DIR
) -> dict[str, Any]:
    """Export a verified shipped model, check it against the Keras model, and write it with its card.

    Args:
        model: a model name (``models/NAME.keras``) or a ``.keras`` file with its card.
        fmt: ``onnx``, ``savedmodel`` or ``litert``.
        out_dir: where to write (default ``exports/<name>/<format>``); replaced as a whole.
        exports_dir: the default's root.

    Returns:
        The ``export.json`` record.

    Raises:
        CxrError: an unknown format; the model is missing or unverified; the conversion failed; or
            the export's probabilities differ from the Keras model's by more than ``1e-4``.
    """
    if fmt not in FORMATS:
        raise CxrError(f"--format {printable(fmt)}: choose one of {', '.join(FORMATS)}")
    lm = load(model_file(model))
    name = lm.path.name.removesuffix(".keras")
    target = Path(out_dir) if out_dir is not None else exports_dir / name / fmt
    scratch = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        record = _export_into(lm, name, fmt, scratch)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    record["folder"] = target.as_posix()
    log.info(
        "%s: exported to %s (%s, sha256 %s…); max |Δp| against Keras %.2g on %d probe images",
        name,
        (target / record["file"]).as_posix(),
        fmt,
        record["sha256"][:12],
        record["parity"]["max_abs_diff"],
        record["parity"]["images"],
    )
    return record


def _export_into(lm: LoadedModel, name: str, fmt: str, folder: Path) -> dict[str, Any]:
    size = lm.input.image_size
    probes = probe_images(size)
    served_p = np.asarray(lm.model.predict(probes, verbose=0)).reshape(-1)
    model = float32_twin(lm.model)
    keras_p = served_p if model is lm.model else np.asarray(model.predict(probes, verbose=0)).reshape(-1)
    path = folder / f"{name}{_SUFFIX[fmt]}"
    try:
        with native_stderr(quiet_on=(Exception,)):
            _convert(model, size, fmt, path)
            run, (input_name, output_name) = _runner(fmt, path)
            exported_p = run(probes)
    except ImportError as exc:
        raise CxrError(f"--format {fmt}: {printable(exc)}; install it (pip install -e .) and rerun") from None
    except Exception as exc:
        reason = printable(str(exc).strip().splitlines()[0][:160]) if str(exc).strip() else type(exc).__name__
        raise CxrError(f"{name}: the {fmt} export failed ({type(exc).__name__}: {reason})") from None
    worst = float(np.max(np.abs(exported_p - keras_p)))
    if not worst <= PARITY_TOLERANCE:
        raise CxrError(
            f"{name}: the {fmt} export differs from the Keras model by up to {worst:.3g} in P(pneumonia) on "
            f"probe images (tolerance {PARITY_TOLERANCE:g}); nothing was written"
        )
    shutil.copyfile(lm.path.with_name(f"{name}.card.json"), folder / f"{name}.card.json")
    threshold, source = lm.threshold(None)
    record = {
        "model": name,
        "format": fmt,
        "file": path.name,
        "sha256": tree_sha256(path),
        "keras_model": lm.path.as_posix(),
        "keras_model_sha256": lm.sha256,
        "card": f"{name}.card.json",
        "threshold": threshold,
        "threshold_source": source,
        "decision": f"PNEUMONIA when the output is at least {threshold:.6g}, else NORMAL",
        "input": {"name": input_name, "shape": ["N", size, size, 3], "dtype": "float32"},
        "output": {"name": output_name, "shape": ["N", 1], "meaning": "P(pneumonia)"},
        "preprocessing": preprocessing(lm),
        "parity": {
            "images": len(probes),
            "max_abs_diff": worst,
            "tolerance": PARITY_TOLERANCE,
            "against": "the Keras model computing in float32",
            # a model trained in mixed precision is served in bf16/fp16 by cxr predict and cxr serve
            "max_abs_diff_vs_mixed_precision": None
            if model is lm.model
            else float(np.max(np.abs(exported_p - served_p))),
        },
        "tools": _versions(fmt),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json(folder / "export.json", record)
    return record


def write_index(exports_dir: Path = EXPORTS_DIR) -> Path:
    """``exports/index.json``: every export below ``exports_dir`` (model, format, folder, file, sha256,
    threshold), rebuilt from their ``export.json`` files; written even when there are none (the
    export stage's output)."""
    from cxr.files import SMALL_FILE, load_json_bounded

    rows = []
    for record_path in sorted(exports_dir.glob("*/*/export.json")):
        record = load_json_bounded(record_path, "export record", SMALL_FILE)
        if isinstance(record, dict):
            keys = ("model", "format", "file", "sha256", "keras_model_sha256", "threshold")
            rows.append({"folder": record_path.parent.as_posix(), **{k: record.get(k) for k in keys}})
    index = exports_dir / "index.json"
    write_json(index, {"exports": rows})
    return index


def preprocessing(lm: LoadedModel) -> dict[str, Any]:
    """What to do to an image before the exported graph sees it (the graph holds the rest)."""
    cfg = lm.input
    return {
        "decode": "JPEG/PNG/BMP as 8-bit RGB (grey repeated in three channels); DICOM: Modality LUT, "
        "VOI LUT or window, MONOCHROME1 inverted, clipped to mean ± 2.5 std, scaled to 0-255 (cxr.inference.dicom)",
        "resize": {
            "size": [cfg.image_size, cfg.image_size],
            "mode": cfg.resize,
            "interpolation": cfg.interpolation,
            "meaning": "squash: stretch to the square; pad: fit inside it keeping the aspect ratio, black borders",
        },
        "scale": "divide the 0-255 pixels by 255 (float32 in [0, 1])",
        "in_graph": "intensity normalisation, centre crop and any ImageNet preprocessing are inside the model",
    }
