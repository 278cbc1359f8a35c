"""Multi-device training: MirroredStrategy over two logical CPU devices (no GPU needed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.factories import REPO_ROOT

SCRIPT = r"""
import json, numpy as np
from cxr.runtime import tensorflow, distribution, configure
tf = tensorflow()
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
configure(seed=1, deterministic=False, precision="float32")
from cxr.training.models import build_model
from cxr.training.train import compile_model
single = distribution("none")
mirrored = distribution("mirrored")
with mirrored.scope():
    model = build_model("smallnet", 32, {})
    compile_model(model, 1e-3)
rng = np.random.default_rng(0)
x = rng.random((64, 32, 32, 3), dtype=np.float32)
y = (x.mean(axis=(1, 2, 3)) > 0.5).astype("float32")
before = [w.copy() for w in model.get_weights()]
history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
after = model.get_weights()
print(json.dumps({
    "replicas": mirrored.num_replicas_in_sync,
    "single_replicas": single.num_replicas_in_sync,
    "devices": list(mirrored.extended.worker_devices),
    "variable_type": type(model.trainable_weights[0].value).__name__,
    "loss": history.history["loss"],
    "changed": any(not np.allclose(a, b) for a, b in zip(before, after)),
}))
"""


@pytest.mark.slow
def test_mirrored_strategy_trains_on_two_logical_cpus():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2 and result["single_replicas"] == 1
    assert len(result["devices"]) == 2 and all("CPU" in d for d in result["devices"])
    assert result["variable_type"] == "MirroredVariable"  # weights replicated on both devices
    assert result["changed"] and all(v == v for v in result["loss"])  # trained, no NaN
