"""The strict config: every misspelled, ill-typed or out-of-range setting gives one line and starts
no work; defaults live in one place and the shipped params.yaml agrees with them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cxr.config import (
    ConfigError,
    DataConfig,
    InputConfig,
    Params,
    TrainConfig,
    defaults,
    load_config,
    parse_params,
)
from cxr.model_options import OPTIONS

REPO = Path(__file__).resolve().parents[1]


def test_the_shipped_params_yaml_loads_strictly_and_equals_the_defaults():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    parsed = parse_params(raw)
    assert parsed.input == Params().input and parsed.data == Params().data and parsed.split == Params().split
    assert parsed.evaluate == Params().evaluate and parsed.prepare == Params().prepare
    assert parsed.train.models == Params().train.models
    for name in ("smallnet", "cxrnet", "vgg16"):  # every model block: TrainConfig defaults + builder defaults
        cfg = parsed.train.model(name)
        assert cfg == TrainConfig.from_params({}, name), name
    assert defaults()["train"]["common"]["optimizer"] == raw["train"]["common"]["optimizer"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("split.seeed=7", r"split\.seeed: unknown key in section split \(known keys: .*\); did you mean seed\?"),
        ("train.smallnet.epoch=3", r"train\.smallnet\.epoch: unknown key .*did you mean epochs\?"),
        ("train.cxrnet.widht=[8,8,8,8]", r"train\.cxrnet\.widht: unknown key .*did you mean widths\?"),
        ("train.common.epoch=3", r"train\.common\.epoch: unknown key .*did you mean epochs\?"),
        ("input.augment.rotation=5", r"input\.augment\.rotation: unknown key .*did you mean rotation_deg\?"),
        (
            "train.common.health.min_auc=0.5",
            r"train\.common\.health\.min_auc: unknown key .*did you mean min_val_auc\?",
        ),
        ("input.image_size=abc", r"input\.image_size='abc': expected a whole number"),
        ("train.smallnet.learning_rate=abc", r"train\.smallnet\.learning_rate='abc': expected a number"),
        ("split.seed=abc", r"split\.seed='abc': expected a whole number"),
        ("prepare.workers=abc", r"prepare\.workers='abc': expected a whole number"),
        ("prepare=5", r"prepare is a section; set one of its keys"),
        ("data.max_files=abc", r"data\.max_files='abc': expected a whole number"),
        ("split.test_size=-0.1", r"split\.test_size=-0\.1: must be in \(0, 1\)"),
        ("train.smallnet.epochs=-1", r"train\.smallnet\.epochs=-1: must be in \[1, 10000\]"),
        ("input.image_size=0", r"input\.image_size=0: must be in \[32, 2048\]"),
        ("prepare.min_images_per_class=-5", r"prepare\.min_images_per_class=-5: must be in \[1, 1000000\]"),
        ("prepare.workers=-3", r"prepare\.workers=-3: must be in \[0, 512\]"),
        ("data.source=ftp", r"data\.source='ftp': choose one of kaggle, dir, medmnist"),
        ("train.models=[nasnet]", r"unknown model 'nasnet'"),
        ("evaluate.threshold_source=external:x", r"no external set named 'x' in evaluate\.external"),
        (
            "train.common.early_stopping.patience=-1",
            r"train\.common\.early_stopping\.patience=-1: must be in \[0, 10000\]",
        ),
        # every integer is bounded by what its consumer takes (issue 19): numpy seeds, bootstrap memory
        ("split.seed=-1", r"split\.seed=-1: must be in \[0, 4294967295\] \(the range numpy"),
        ("split.seed=4294967296", r"split\.seed=4294967296: must be in \[0, 4294967295\]"),
        ("train.common.seed=-1", r"train\.common\.seed=-1: must be in \[0, 4294967295\]"),
        ("evaluate.seed=-1", r"evaluate\.seed=-1: must be in \[0, 4294967295\]"),
        ("evaluate.bootstrap=1000000000000", r"evaluate\.bootstrap=1000000000000: must be in \[0, 100000\]"),
        ("input.batch_size=100000000", r"input\.batch_size=100000000: must be in \[1, 4096\]"),
        ("train.common.tensorboard=maybe", r"train\.common\.tensorboard='maybe': expected true or false"),
    ],
)
def test_bad_settings_give_one_line_naming_key_and_value(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(REPO / "params.yaml", [override])
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(("params.yaml with -S ", "override "))


def test_a_bad_key_in_the_file_names_the_file(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["split"]["seeed"] = 7
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"^params\.yaml: split\.seeed: unknown key"):
        load_config(tmp_path / "params.yaml")


def test_a_model_block_may_override_common_settings_and_declare_builder_options():
    cfg = TrainConfig.from_params(
        {
            "common": {"epochs": 3, "early_stopping": {"patience": 2}},
            "cxrnet": {"epochs": 5, "dropout": 0.1, "early_stopping": {"min_delta": 0.01}},
        },
        "cxrnet",
    )
    assert cfg.epochs == 5 and cfg.model["dropout"] == 0.1 and cfg.model["widths"] == [32, 64, 128, 128]
    assert (cfg.early_stopping.patience, cfg.early_stopping.min_delta) == (2, 0.01)
    assert set(OPTIONS) == {"smallnet", "cxrnet", "vgg16", "resnet"}


def test_numbers_written_the_yaml_1_1_way_are_read_as_numbers():
    assert load_config(REPO / "params.yaml", ['train.common.reduce_lr={"min_lr": "1e-6"}']).train.model(
        "smallnet"
    ).reduce_lr.min_lr == pytest.approx(1e-6)


@pytest.mark.parametrize("argv", [["fetch"], ["prepare"], ["train", "--model", "smallnet"], ["evaluate"]])
def test_the_cli_refuses_a_bad_setting_before_any_work(tmp_path, argv):
    shutil_params = tmp_path / "params.yaml"
    shutil_params.write_text((REPO / "params.yaml").read_text())
    proc = subprocess.run(
        [sys.executable, "-m", "cxr", *argv, "-S", "split.seeed=7"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "CXR_NO_PROGRESS": "1"},
    )
    assert proc.returncode == 1
    assert (
        proc.stderr.strip().splitlines() == [proc.stderr.strip()]
        and "split.seeed: unknown key" in proc.stderr
        and "did you mean seed?" in proc.stderr
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written, nothing fetched


def test_the_flow_refuses_a_bad_flow_parameter_before_any_task(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    proc = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", "-S", "train.smallnet.epochs=-1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect")},
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("train.smallnet.epochs=-1: must be in [1, 10000]")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()


def test_the_scheduler_refuses_a_bad_setting_before_serving(tmp_path):
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    proc = subprocess.run(
        [sys.executable, "-m", "flows.schedule", "--cron", "0 3 * * 1", "-S", "split.seeed=1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect")},
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("did you mean seed?") and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("override", "read"),
    [  # YAML 1.1 reads 1e-3 as text; JSON (-S) reads 1e3 as a float
        ("input.image_size=64.0", ("input", "image_size", 64)),
        ("input.image_size='96'", ("input", "image_size", 96)),
        ("input.image_size='1e2'", ("input", "image_size", 100)),
        ("train.smallnet.epochs=1e3", ("train", "epochs", 1000)),
        ("train.smallnet.learning_rate='1e-3'", ("train", "learning_rate", 1e-3)),
        ("train.smallnet.learning_rate=1", ("train", "learning_rate", 1.0)),
        ("train.common.steps_per_epoch=null", ("train", "steps_per_epoch", None)),
    ],
)
def test_numbers_are_read_as_yaml_and_json_write_them(override, read):
    config = load_config(REPO / "params.yaml", [override])
    section, key, value = read
    got = getattr(config.train.model("smallnet") if section == "train" else config.input, key)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("input.image_size=true", r"input\.image_size=True: expected a whole number"),
        ("input.image_size=64.5", r"input\.image_size=64\.5: expected a whole number"),
        ("train.common.learning_rate=true", r"train\.common\.learning_rate=True: expected a number"),
        ("train.common.learning_rate=.inf", r"train\.common\.learning_rate=inf: expected a number"),
        ("train.common.tensorboard=1", r"train\.common\.tensorboard=1: expected true or false"),
        ("train.common.monitor=5", r"train\.common\.monitor=5: expected text"),
        ("train.cxrnet.widths=[8,8,8,true]", r"train\.cxrnet\.widths\[3\]=True: expected a whole number"),
        ("train.vgg16.imagenet_preprocessing=1", r"train\.vgg16\.imagenet_preprocessing=1: expected true or false"),
        ("train.cxrnet.widths=[1,2]", r"train\.cxrnet: widths=\[1, 2\]: four positive filter counts"),
        ("data.link_roots=[a, 5]", r"data\.link_roots\[1\]=5: expected text"),
        ("export.formats=[pdf]", r"export\.formats\[0\]='pdf': choose one of onnx, savedmodel, litert"),
        ("data.max_ratio=1", r"data\.max_ratio=1\.0: must be > 1 \(zip-bomb guard"),
        ("nosuch.x=1", r"nosuch: unknown key at the top level \(known keys: data, prepare, split, "),
    ],
)
def test_wrong_types_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(REPO / "params.yaml", [override])
    assert "\n" not in str(info.value)


def test_the_first_of_several_problems_is_reported_unknown_keys_first():
    with pytest.raises(ConfigError, match=r"^params\.yaml: split\.seeed: unknown key"):
        parse_params({"split": {"seed": -1, "seeed": 1}, "input": {"image_size": "abc"}})
    with pytest.raises(ConfigError, match=r"^params\.yaml: input\.image_size='abc': expected a whole number$"):
        parse_params({"input": {"augment": {"zoom": 2}, "image_size": "abc"}})


def test_a_section_built_in_code_is_checked_like_params_yaml_and_an_empty_one_is_the_defaults():
    with pytest.raises(ConfigError, match=r"^input\.augment\.zoom=2\.0: must be in \[0, 1\)$"):
        InputConfig(augment={"zoom": 2})
    with pytest.raises(ConfigError, match=r"^data\.source='ftp': choose one of kaggle, dir, medmnist, sample, auto$"):
        DataConfig(source="ftp")
    assert parse_params({"split": None, "input": {"augment": None}, "train": None}) == Params()
    assert InputConfig.from_params({"augment": {"augment_validation": True}}).augment_validation is True
