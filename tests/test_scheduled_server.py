"""Scheduled retraining against a real Prefect server on loopback: deploy, trigger, check artifacts.

No mocks: `prefect server start` on 127.0.0.1, `python -m flows.schedule` serving the deployment,
`prefect deployment run` triggering it, and the server's REST API read back.
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

pytestmark = pytest.mark.slow

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


def _wait(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited early:\n{proc.stdout.read() if proc.stdout else ''}")
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


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
        "train.models=[smallnet]",
        "ensemble.members=[]",
        "train.smallnet.epochs=1",
        "train.common.steps_per_epoch=2",
        "train.common.tensorboard=false",
        "train.common.health.on_collapse=warn",
        "input.image_size=32",
        "input.batch_size=8",
        "evaluate.bootstrap=50",
        "evaluate.gradcam_per_outcome=1",
    ]
    serve_cmd = [sys.executable, "-m", "flows.schedule", "--cron", "0 0 1 1 *", "--name", "test"]
    for item in overrides:
        serve_cmd += ["-S", item]
    serve = subprocess.Popen(
        serve_cmd,
        cwd=project,
        env={**env, "CXR_NO_PROGRESS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def deployment():
            r = httpx.post(f"{api}/deployments/filter", json={"deployments": {"name": {"any_": ["test"]}}})
            return r.json() if r.status_code == 200 and r.json() else None

        deployed = _wait(deployment, 120, "the deployment to register", serve)[0]
        assert deployed["schedules"][0]["schedule"]["cron"] == "0 0 1 1 *"

        def run_once() -> dict:
            created = httpx.post(f"{api}/deployments/{deployed['id']}/create_flow_run", json={}).json()

            def finished():
                run = httpx.get(f"{api}/flow_runs/{created['id']}").json()
                return run if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

            run = _wait(finished, 480, "the scheduled flow run", serve)
            assert run["state"]["type"] == "COMPLETED", run["state"]
            return run

        first = run_once()
        lineage = project / "lineage/models.jsonl"
        records = [json.loads(line) for line in lineage.read_text().splitlines()]
        assert len(records) == 1 and records[0]["run"]["driver"] == "prefect"
        assert records[0]["run"]["flow_run_id"] == first["id"]
        artifacts = httpx.post(
            f"{api}/artifacts/filter", json={"artifacts": {"key": {"any_": ["cxr-report", "cxr-metrics"]}}}
        ).json()
        assert {a["key"] for a in artifacts} == {"cxr-report", "cxr-metrics"}
        table = next(a for a in artifacts if a["key"] == "cxr-metrics")
        assert "smallnet" in json.dumps(table["data"])
        assert (project / "reports/report.html").is_file()

        # the data did not change: the second scheduled run retrains nothing
        again = run_once()
        runs = httpx.post(f"{api}/task_runs/filter", json={}).json()
        states = {t["name"]: t["state"]["name"] for t in runs if t["flow_run_id"] == again["id"]}
        trained = [name for name in states if name.startswith("train")]
        assert trained and all(states[name] == "Cached" for name in trained), states
        assert len(lineage.read_text().splitlines()) == 1
    finally:
        serve.terminate()
        try:
            serve.wait(timeout=20)
        except subprocess.TimeoutExpired:
            serve.kill()
