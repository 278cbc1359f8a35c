"""Scheduled retraining against a real Prefect server on loopback: deploy, trigger, check artifacts.

No mocks: `prefect server start` on 127.0.0.1, `python -m flows.schedule` serving the deployment,
`prefect deployment run` triggering it, and the server's REST API (and the Prefect client) read back:
the schedule's time zone, the served flow's task runner (models train one at a time), and each
step's log lines (the training epochs) in the run's logs. The fast tests check what
``flows.schedule`` refuses before serving and the flow it would serve.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.factories import REPO_ROOT, kermany_layout

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _copy_repo(target: Path) -> None:
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO_ROOT,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = REPO_ROOT / rel
        if src.is_file() and not rel.startswith(("dvc.lock", "lineage/models.jsonl")):
            (target / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target / rel)


def _tail(log: Path | None, lines: int = 80) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log and log.is_file() else ""


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            output = _tail(log) if log else (proc.stdout.read() if proc.stdout else "")
            raise AssertionError(f"{what}: process exited early:\n{output}")
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}\n{_tail(log)}")


@pytest.fixture
def prefect_server(tmp_path):
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
    }
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def healthy() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait(healthy, 120, "the Prefect server", server)
        yield env
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def _run_logs(api: str, flow_run_id: str, text: str) -> list:
    """The run's log records containing ``text``, read with the Prefect client."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId, LogFilterTextSearch

    with SyncPrefectClient(api) as client:
        return client.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]), text=LogFilterTextSearch(query=text))
        )


def test_the_scheduler_refuses_a_bad_time_zone_or_cron_expression_in_one_line(tmp_path, monkeypatch, capsys):
    from flows.schedule import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    for args, names in [
        (["--cron", "0 3 * * 1", "--timezone", "Mars/Olympus_Mons"], ["--timezone", "Mars/Olympus_Mons", "IANA"]),
        (["--cron", "0 3 * *"], ["--cron", "0 3 * *", "five fields"]),
        (["--cron", "61 3 * * 1"], ["--cron", "61 3 * * 1"]),
    ]:
        assert main(args) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("cxr: error: ") and len(err.splitlines()) == 1, err
        assert all(name in err for name in names), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_the_scheduler_serves_the_runner_configured_flow_with_its_time_zone(tmp_path, monkeypatch):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.schedule import plan

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    local = ["-S", "data.source=dir", "-S", f"data.dir={tmp_path}"]
    served = plan(
        ["--cron", "0 3 * * 1", "--timezone", "Europe/Paris", *local, "-S", "orchestration.max_parallel_training=2"]
    )
    assert isinstance(served.flow.task_runner, ThreadPoolTaskRunner) and served.flow.task_runner._max_workers == 2
    (schedule,) = served.serve_kwargs["schedules"]
    assert (schedule.cron, schedule.timezone) == ("0 3 * * 1", "Europe/Paris")
    assert served.serve_kwargs["parameters"]["scheduled"] is True
    assert served.serve_kwargs["parameters"]["refresh_source"] is True

    on_dask = plan(["--cron", "0 3 * * 1", *local, "--dask", "tcp://127.0.0.1:8786"])
    assert isinstance(on_dask.flow.task_runner, DaskTaskRunner)
    assert on_dask.flow.task_runner.address == "tcp://127.0.0.1:8786"
    assert on_dask.serve_kwargs["schedules"][0].timezone == "UTC"


def test_the_scheduler_refuses_the_embedded_demo_sample(tmp_path, monkeypatch, capsys):
    from flows.schedule import main

    for var in ("KAGGLE_API_TOKEN", "KAGGLE_API_V1_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    assert main(["--cron", "0 3 * * 1", "-S", "data.source=auto"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("cxr: error: scheduled retraining needs real data"), err
    assert "Kaggle credentials" in err and "data.source: dir" in err


@pytest.mark.slow
def test_scheduled_deployment_runs_and_reuses_unchanged_data(prefect_server, make_dataset, tmp_path):
    env = prefect_server
    api = env["PREFECT_API_URL"]
    project = tmp_path / "project"
    _copy_repo(project)
    source = make_dataset(kermany_layout(n_patients=12), root=tmp_path / "xrays")
    overrides = [
        "data.source=dir",
        f"data.dir={source}",
        "prepare.min_images_per_class=1",
        # two models, one at a time: the served flow must use the configured runner, not Prefect's
        # default thread pool (which would train both at once)
        "train.models=[smallnet, cxrnet]",
        "train.cxrnet.epochs=1",
        "orchestration.max_parallel_training=1",
        "ensemble.members=[]",
        "train.smallnet.epochs=1",
        "train.common.steps_per_epoch=2",
        "train.common.tensorboard=false",
        "train.common.health.on_collapse=warn",
        "input.image_size=32",
        "input.batch_size=8",
        "evaluate.bootstrap=50",
        "evaluate.gradcam_per_outcome=1",
        "export.formats=[]",
    ]
    serve_cmd = [sys.executable, "-m", "flows.schedule", "--cron", "0 0 1 1 *", "--timezone", "Asia/Tokyo"]
    serve_cmd += ["--name", "test"]
    for item in overrides:
        serve_cmd += ["-S", item]
    serve_log = tmp_path / "serve.log"  # a file, not a pipe: the runs' console output must never stall them
    serve = subprocess.Popen(
        serve_cmd,
        cwd=project,
        env={**env, "CXR_NO_PROGRESS": "1"},
        stdout=serve_log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def deployment():
            r = httpx.post(f"{api}/deployments/filter", json={"deployments": {"name": {"any_": ["test"]}}})
            return r.json() if r.status_code == 200 and r.json() else None

        deployed = _wait(deployment, 120, "the deployment to register", serve, serve_log)[0]
        from prefect.client.orchestration import SyncPrefectClient

        with SyncPrefectClient(api) as client:
            (stored,) = client.read_deployment(deployed["id"]).schedules
        assert (stored.schedule.cron, stored.schedule.timezone) == ("0 0 1 1 *", "Asia/Tokyo")

        def run_once() -> dict:
            def create() -> dict | None:  # a loaded SQLite-backed server answers 503 for a moment: ask again
                answer = httpx.post(f"{api}/deployments/{deployed['id']}/create_flow_run", json={})
                return answer.json() if answer.status_code != 503 else None

            created = _wait(create, 60, "the API to accept the run", serve, serve_log)
            assert "id" in created, f"the API refused the run: {created}"

            def finished():
                run = httpx.get(f"{api}/flow_runs/{created['id']}").json()
                return run if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

            run = _wait(finished, 480, "the scheduled flow run", serve, serve_log)
            assert run["state"]["type"] == "COMPLETED", f"{run['state']['message']}\n{_tail(serve_log)}"
            return run

        first = run_once()
        lineage = project / "lineage/models.jsonl"
        records = [json.loads(line) for line in lineage.read_text().splitlines()]
        trained_records = [r for r in records if "event" not in r]  # one per model, and its promotion event
        assert len(trained_records) == 2 and [r["event"] for r in records if "event" in r] == ["promotion"] * 2
        assert {r["run"]["driver"] for r in records} == {"prefect"}
        assert {r["run"]["flow_run_id"] for r in records} == {first["id"]}

        # the configured runner: one training at a time, and the run's log says so
        task_runs = httpx.post(
            f"{api}/task_runs/filter", json={"task_runs": {"name": {"any_": ["train-smallnet", "train-cxrnet"]}}}
        ).json()
        spans = sorted((t["start_time"], t["end_time"]) for t in task_runs if t["flow_run_id"] == first["id"])
        assert len(spans) == 2 and spans[0][1] <= spans[1][0], spans
        assert _wait(lambda: _run_logs(api, first["id"], "at most 1"), 30, "the task-runner line in the run's log")

        # the child's epoch lines reach the Prefect API, at INFO, under the training task
        epochs = _wait(lambda: _run_logs(api, first["id"], "epoch"), 30, "the epoch lines in the run's log")
        lines = [(log.level, log.message) for log in epochs]
        for model in ("smallnet", "cxrnet"):
            assert any(m.startswith(f"cxr.training.train: {model} epoch 1/1 ") and lv == 20 for lv, m in lines), lines
        train_ids = {t["id"] for t in task_runs if t["flow_run_id"] == first["id"]}
        assert {str(log.task_run_id) for log in epochs if "epoch 1/1" in log.message} == train_ids, epochs
        artifacts = httpx.post(
            f"{api}/artifacts/filter", json={"artifacts": {"key": {"any_": ["cxr-report", "cxr-metrics"]}}}
        ).json()
        assert {a["key"] for a in artifacts} == {"cxr-report", "cxr-metrics"}
        table = next(a for a in artifacts if a["key"] == "cxr-metrics")
        assert "smallnet" in json.dumps(table["data"])
        # each model's champion/challenger decision, as a markdown artifact of the run
        decisions = httpx.post(
            f"{api}/artifacts/filter",
            json={"artifacts": {"key": {"any_": ["promotion-smallnet", "promotion-cxrnet"]}}},
        ).json()
        assert {a["key"] for a in decisions} == {"promotion-smallnet", "promotion-cxrnet"}
        assert all(a["type"] == "markdown" and a["flow_run_id"] == first["id"] for a in decisions)
        assert all("first model" in a["data"] and "| version |" in a["data"] for a in decisions), decisions
        assert (project / "reports/report.html").is_file()

        # the data did not change: the second scheduled run retrains nothing
        again = run_once()
        runs = httpx.post(f"{api}/task_runs/filter", json={}).json()
        states = {t["name"]: t["state"]["name"] for t in runs if t["flow_run_id"] == again["id"]}
        trained = [name for name in states if name.startswith("train")]
        assert trained and all(states[name] == "Cached" for name in trained), states
        assert len(lineage.read_text().splitlines()) == 4  # no new lineage record: nothing retrained or decided
    finally:
        serve.terminate()
        try:
            serve.wait(timeout=20)
        except subprocess.TimeoutExpired:
            serve.kill()
