"""Import and configure TensorFlow quietly, once.

TensorFlow's C++ start-up banner (oneDNN, CUDA stubs) is printed before its logging is set up,
so no environment variable hides it; the import runs with stderr captured at the file-descriptor
level, and the captured text is shown only if the import fails.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from functools import cache
from types import ModuleType
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@contextlib.contextmanager
def _quiet_fd2():
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield sink
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@cache
def tensorflow() -> ModuleType:
    """The ``tensorflow`` module, imported without its start-up noise.

    Cached: the first call imports (stderr captured, shown only if the import fails) and sets
    TensorFlow's Python logger to ERROR; later calls return the same module.

    Returns:
        The ``tensorflow`` module.
    """
    with _quiet_fd2():
        import tensorflow as tf
    tf.get_logger().setLevel("ERROR")
    return tf


def cpu_has_bf16() -> bool:
    """True on CPUs with native bfloat16 arithmetic (AVX512-BF16 or AMX).

    Returns:
        Whether ``/proc/cpuinfo`` lists ``avx512_bf16`` or ``amx_bf16``; False where it cannot be
        read (not Linux).
    """
    try:
        with open("/proc/cpuinfo") as handle:
            flags = handle.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def configure(seed: int, deterministic: bool, precision: str = "auto") -> str:
    """Seed every RNG, set op determinism and the mixed-precision policy; return the policy used.

    Args:
        seed: seeds Python's ``random``, NumPy and TensorFlow (``keras.utils.set_random_seed``).
        deterministic: turn on TensorFlow's op determinism (same data + seed → same weights, at
            some speed).
        precision: ``auto`` (``mixed_float16`` with a GPU, ``mixed_bfloat16`` on a CPU with native
            bfloat16, else ``float32``), ``float32``, ``bfloat16`` or ``float16``.

    Returns:
        The Keras global dtype policy now set: ``float32``, ``mixed_bfloat16`` or ``mixed_float16``.
    """
    tf = tensorflow()
    import keras

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    with _quiet_fd2():  # a machine without a GPU logs a CUDA initialisation error here
        gpus = tf.config.list_physical_devices("GPU")
    if precision == "auto":
        policy = "mixed_float16" if gpus else ("mixed_bfloat16" if cpu_has_bf16() else "float32")
    else:
        policy = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}[precision]
    keras.mixed_precision.set_global_policy(policy)
    return policy


def distribution(kind: str = "auto") -> Any:
    """The tf.distribute strategy to build and train under.

    Args:
        kind: ``auto``: MirroredStrategy when more than one GPU is visible, else the default (one
            device); ``mirrored``: MirroredStrategy over every GPU, or every logical CPU when there
            is no GPU (tests split the CPU into logical devices); ``none``: the default strategy.

    Returns:
        The ``tf.distribute.Strategy`` whose scope the model is built and trained in.

    Raises:
        ValueError: ``kind`` is not ``auto``, ``mirrored`` or ``none``.
    """
    tf = tensorflow()
    if kind not in ("auto", "mirrored", "none"):
        raise ValueError(f"distribute={kind!r}: choose auto, mirrored or none")
    with _quiet_fd2():
        gpus = tf.config.list_logical_devices("GPU")
    if kind == "none" or (kind == "auto" and len(gpus) < 2):
        return tf.distribute.get_strategy()
    devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices=devices)
