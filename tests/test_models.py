"""The model registry: architectures, parameter counts, safe saving, and the VGG16 weights error."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest

from cxr.common.layers import ImagenetCaffePreprocess
from cxr.errors import CxrError
from cxr.runtime import tensorflow
from cxr.training.models import REGISTRY, build_model

tensorflow()
import keras  # noqa: E402


@pytest.fixture(autouse=True)
def float32_policy():
    """Training tests may leave a mixed-precision policy behind; these counts and checks are float32."""
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy(previous)


def n_params(weights) -> int:
    return int(sum(np.prod(w.shape) for w in weights))


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, size, size, 3), dtype=np.float32)


# --- smallnet ----------------------------------------------------------------------------------


def test_smallnet_is_the_notebook_architecture():
    model = build_model("smallnet", 224, {})
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    kinds = [type(layer).__name__ for layer in layers]
    assert kinds == ["Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Conv2D", "Flatten", "Dense", "Dense"]
    for conv in (layer for layer in layers if isinstance(layer, keras.layers.Conv2D)):
        config = conv.get_config()
        assert config["filters"] == 32
        assert tuple(config["kernel_size"]) == (3, 3)
        assert config["activation"] == "relu"
        assert config["padding"] == "valid"
    for pool in (layer for layer in layers if isinstance(layer, keras.layers.MaxPooling2D)):
        assert tuple(pool.get_config()["pool_size"]) == (2, 2)
    hidden, output = layers[-2].get_config(), layers[-1].get_config()
    assert (hidden["units"], hidden["activation"]) == (32, "relu")
    assert (output["units"], output["activation"]) == (1, "sigmoid")
    assert model.input_shape == (None, 224, 224, 3)
    assert model.output_shape == (None, 1)
    # 224 → conv 222 → pool 111 → conv 109 → pool 54 → conv 52: Flatten of 52·52·32
    flat = 52 * 52 * 32
    convs = (3 * 3 * 3 * 32 + 32) + 2 * (3 * 3 * 32 * 32 + 32)
    expected = convs + (flat * 32 + 32) + (32 + 1)
    assert model.count_params() == expected == 2_788_353


def test_smallnet_reaches_its_last_convolution_for_grad_cam():
    model = build_model("smallnet", 64, {})
    grad_model = keras.Model(model.inputs, [model.get_layer("conv3").output, model.output])
    x = tensorflow().constant(random_images(2, 64))
    with tensorflow().GradientTape() as tape:
        conv, prediction = grad_model(x)
        score = prediction[:, 0]
    grads = tape.gradient(score, conv)
    assert tuple(conv.shape) == (2, 12, 12, 32)
    assert tuple(prediction.shape) == (2, 1)
    assert grads is not None and tuple(grads.shape) == tuple(conv.shape)
    assert np.isfinite(grads.numpy()).all()
    np.testing.assert_allclose(prediction.numpy(), model.predict(x.numpy(), verbose=0), atol=1e-6)


# --- cxrnet ------------------------------------------------------------------------------------


def test_cxrnet_is_much_smaller_than_smallnet():
    small = build_model("smallnet", 224, {}).count_params()
    compact = build_model("cxrnet", 224, {"widths": [32, 64, 128, 128], "dropout": 0.3})
    assert compact.count_params() < 0.25 * small
    assert compact.output_shape == (None, 1)
    assert compact.layers[-1].get_config()["activation"] == "sigmoid"
    wider = build_model("cxrnet", 224, {"widths": [32, 64, 128, 256]})
    assert wider.count_params() > compact.count_params()  # the widths option is honoured


# --- vgg16 -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_vgg16_without_weights_has_the_spec_counts_and_trains_one_step():
    model = build_model("vgg16", 224, {"weights": "none", "dropout": 0.2, "imagenet_preprocessing": True})
    assert model.count_params() == 121_872_289
    assert n_params(model.trainable_weights) == 107_157_601
    assert n_params(model.non_trainable_weights) == 14_714_688
    assert [layer.name for layer in model.layers] == [
        "image",
        "to_0_255",
        "imagenet_preprocess",
        "vgg16",
        "flatten",
        "fc1",
        "fc2",
        "dropout",
        "pneumonia",
    ]
    assert not model.get_layer("vgg16").trainable

    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    frozen_before = [w.numpy().copy() for w in model.non_trainable_weights]
    head_before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(random_images(2, 224), np.array([0.0, 1.0], np.float32), batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    for before, w in zip(frozen_before, model.non_trainable_weights, strict=True):
        np.testing.assert_array_equal(before, w.numpy())  # the convolutional base stays frozen
    changed = [
        not np.array_equal(before, w.numpy()) for before, w in zip(head_before, model.trainable_weights, strict=True)
    ]
    assert all(changed)  # every head weight got an update


def test_vgg16_head_counts_at_a_small_size():
    model = build_model("vgg16", 64, {"weights": "none"})
    flat = 2 * 2 * 512  # five 2× poolings: 64 → 2
    head = (flat * 4096 + 4096) + (4096 * 1072 + 1072) + (1072 + 1)
    assert n_params(model.non_trainable_weights) == 14_714_688
    assert n_params(model.trainable_weights) == head
    assert model.get_layer("dropout").get_config()["rate"] == pytest.approx(0.2)


def test_imagenet_preprocessing_is_a_caffe_style_layer():
    model = build_model("vgg16", 32, {"weights": "none", "imagenet_preprocessing": True})
    assert isinstance(model.get_layer("imagenet_preprocess"), ImagenetCaffePreprocess)
    plain = build_model("vgg16", 32, {"weights": "none", "imagenet_preprocessing": False})
    assert "imagenet_preprocess" not in [layer.name for layer in plain.layers]
    rgb = np.array([[[[10.0, 20.0, 30.0]]]], np.float32)
    out = np.asarray(ImagenetCaffePreprocess()(rgb))
    np.testing.assert_allclose(out[0, 0, 0], [30 - 103.939, 20 - 116.779, 10 - 123.68], rtol=1e-6)


def test_vgg16_imagenet_download_failure_names_the_fix(tmp_path, monkeypatch):
    import keras.src.backend.config as keras_config

    home = tmp_path / "keras_home"
    home.mkdir()
    monkeypatch.setenv("KERAS_HOME", str(home))
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(home))  # read once at import time
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # the discard port: refused at once, offline
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(urllib.request, "_opener", None)  # rebuild the opener with these proxies

    with pytest.raises(CxrError) as info:
        build_model("vgg16", 32, {"weights": "imagenet"})
    message = str(info.value)
    assert "ImageNet weights" in message
    assert "~/.keras/models" in message
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in message
    assert "local .h5/.keras weights file" in message
    assert "none" in message
    assert "\n" not in message
    assert info.value.__cause__ is not None  # the download really was attempted and failed
    assert not list(home.rglob("*.h5"))  # nothing partial left in the cache


def test_vgg16_missing_weights_file(tmp_path):
    with pytest.raises(CxrError, match=r"train.vgg16.weights=.*missing.h5: file not found"):
        build_model("vgg16", 32, {"weights": str(tmp_path / "missing.h5")})


def test_vgg16_loads_a_local_weights_file(tmp_path):
    donor = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "base.weights.h5"
    donor.save_weights(path)
    model = build_model("vgg16", 32, {"weights": str(path)})
    base = model.get_layer("vgg16")
    for a, b in zip(donor.get_weights(), base.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not base.trainable


# --- registry and saving -----------------------------------------------------------------------


def test_unknown_model_lists_the_registry():
    with pytest.raises(CxrError, match=r"unknown model 'nasnet': choose one of cxrnet, resnet, smallnet, vgg16"):
        build_model("nasnet", 64, {})
    assert {"smallnet", "cxrnet", "vgg16"} <= set(REGISTRY)


@pytest.mark.parametrize(
    ("name", "size", "cfg"),
    [
        ("smallnet", 32, {}),
        ("cxrnet", 32, {"widths": [8, 16, 16, 16], "dropout": 0.3}),
        ("vgg16", 64, {"weights": "none", "imagenet_preprocessing": True, "dropout": 0.2}),
        ("resnet", 32, {"widths": [8, 8, 16, 16], "blocks": [1, 2, 1, 1], "drop_path": 0.2}),
    ],
)
def test_saved_models_reload_safely_with_identical_predictions(tmp_path, name, size, cfg):
    model = build_model(name, size, cfg)
    x = random_images(4, size, seed=3)
    expected = model.predict(x, verbose=0)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]
    assert loaded.count_params() == model.count_params()
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, rtol=0, atol=1e-6)
    assert expected.std() > 0 or name == "vgg16"  # not a trivially constant model


def test_resnet_has_residual_stages_and_stochastic_depth_only_while_training():
    from cxr.common.layers import StochasticDepth

    model = build_model("resnet", 32, {"widths": [8, 8, 16, 16], "blocks": [1, 2, 1, 1], "drop_path": 0.2})
    adds = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Add)]
    assert len(adds) == 5  # one per block
    drops = [layer for layer in model.layers if isinstance(layer, StochasticDepth)]
    assert [round(d.rate, 3) for d in drops] == [0.05, 0.1, 0.15, 0.2]  # rising to drop_path; the first block keeps all
    x = random_images(8, 32, seed=1)
    np.testing.assert_allclose(model(x, training=False), model(x, training=False))  # the identity at inference
    branch = keras.ops.ones((64, 2, 2, 3))
    dropped = keras.ops.convert_to_numpy(StochasticDepth(0.5)(branch, training=True))
    kept = np.unique(dropped)
    assert set(kept.tolist()) <= {0.0, 2.0} and 0 < (dropped[:, 0, 0, 0] == 0).mean() < 1  # whole examples, rescaled
