"""Shared fixtures: a Kaggle-layout folder builder, the in-process CLI and the small trained/evaluated project.

The plain builders behind them live in ``tests/factories.py``; test modules import those from there, never
from this file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.logging.configuration import setup_logging as _setup_prefect_logging

from tests.factories import build_evaluated_project, build_trained_project, write_image

# Prefect's first logging setup (``import prefect`` does it) replaces every logging handler that exists,
# closing each one; absl's handler, which TensorFlow's import creates on whatever ``sys.stderr`` is then,
# closes its stream when it is not the current ``sys.stderr``. So when a test first imported TensorFlow
# under pytest's capture and a later ``capsys`` test then first imported Prefect, pytest's own capture
# file was closed and every later test on that process errored ("I/O operation on closed file"; it
# took pytest-xdist's test order to meet it). Prefect's setup runs here, before any handler exists;
# its later calls are incremental and close nothing.
_setup_prefect_logging()  # tests.factories imports neither TensorFlow nor absl

# before any test module imports TensorFlow (tests.factories imports no cxr module at import time)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CXR_NO_PROGRESS", "1")


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Build ``root/[split/]CLASS/name`` from ``{"train/NORMAL": ["IM-0001-0001.jpeg", ...]}``."""

    def build(layout: dict[str, list[str]], root: Path | None = None) -> Path:
        root = root or tmp_path / "source"
        seed = 0
        for folder, names in layout.items():
            for name in names:
                seed += 1
                fmt = "PNG" if name.lower().endswith(".png") else "JPEG"
                write_image(root / folder / name, seed, fmt=fmt)
        return root

    return build


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[[list[str]], tuple[int, str, str]]]:
    """Run ``cxr.cli.main`` in-process → (exit code, stdout, stderr); restore the log handlers after."""
    from cxr.cli import main

    loggers = [logging.getLogger(n) for n in ("cxr", "tasks", "flows")]
    saved = [(lg.handlers[:], lg.level, lg.propagate) for lg in loggers]

    def run(argv: list[str]) -> tuple[int, str, str]:
        code = main(argv)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    yield run
    for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        lg.handlers, lg.level, lg.propagate = handlers, level, propagate


# ------------------------------------------------------------ the small project, built once per session


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic dark NORMAL / bright PNEUMONIA images → prepare → smallnet (3 epochs, 32 px), with the
    ``params.yaml`` it used (``factories.small_params()``). Shared by every module: copy it before writing."""
    return build_trained_project(tmp_path_factory.mktemp("cxr-trained-project"))


@pytest.fixture(scope="session")
def evaluated(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of ``trained`` plus ``evaluate`` and ``explain`` outputs. Shared by every module: copy it
    before writing."""
    return build_evaluated_project(tmp_path_factory.mktemp("cxr-evaluated-project"), trained)


# ------------------------------------------------------------ running the suite in parallel (pytest-xdist)


# the modules of the longest tests (pytest --durations: 1-4 minutes each on two cores)
_LONGEST = (
    "tests/test_dvc_pipeline.py",
    "tests/test_flow.py",
    "tests/test_stages.py",
    "tests/test_scheduled_server.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The long integration tests first: those of :data:`_LONGEST`, then the other ``slow`` ones, then the
    rest, each group in file order. pytest-xdist hands tests out in that order, so the longest start
    first and the short ones fill in around them, instead of one long test running alone at the end."""

    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("slow") is None:
            return 2
        return 0 if item.nodeid.startswith(_LONGEST) else 1

    items.sort(key=rank)


# the modules whose tests share an expensive module-scoped fixture (a running server, a Prefect test server,
# a trained or exported project: 5-13 s each); pytest-xdist's `load` distribution spread their tests over
# both workers, and each worker built the fixture again (60 s of the suite's work, measured with --durations)
SHARED_MODULE_FIXTURES = (
    "tests/hostile/test_serve_load.py",
    "tests/test_domain_check.py",
    "tests/test_dvc_plots.py",
    "tests/test_export.py",
    "tests/test_flow.py",
    "tests/test_serve.py",
    "tests/test_serve_openapi.py",
    "tests/test_train.py",
)

# the modules whose tests use a machine-wide resource: the Kaggle stand-in listens on port 80 (the client's
# LOCALHOST environment has no port), and some tests there expect nothing to listen on it
SHARED_MACHINE_RESOURCES = ("tests/test_kaggle_fetch.py",)
_ONE_WORKER_MODULES = frozenset(SHARED_MODULE_FIXTURES + SHARED_MACHINE_RESOURCES)


@pytest.fixture(scope="session")
def shared_module_fixtures() -> tuple[str, ...]:
    """:data:`SHARED_MODULE_FIXTURES`, for the test that keeps it true (test modules never import conftest)."""
    return SHARED_MODULE_FIXTURES


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``-n``: pytest-xdist's ``load`` distribution (one test at a time, in the order above), except that
    the tests of each module of :data:`SHARED_MODULE_FIXTURES` and :data:`SHARED_MACHINE_RESOURCES` go to
    one worker together.

    pytest-xdist's own ``--dist loadgroup`` would do it with ``xdist_group`` marks, but it silently stopped
    grouping on pytest 9.2 (pytest-xdist issue 1386: it renames the node ids, which pytest no longer
    reads), so this scheduler groups by node id instead. Another ``--dist`` keeps its own scheduler."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureModules(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in _ONE_WORKER_MODULES else nodeid

    config.option.loadscopereorder = False  # keep the longest-first order of pytest_collection_modifyitems
    return SharedFixtureModules(config, log)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker per core, at most four (each worker's TensorFlow children use every core
    and about 2 GB; more workers only contend)."""
    return max(1, min(os.cpu_count() or 1, 4))
