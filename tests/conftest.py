"""Test configuration.

On a machine without a GPU the kernels run in Pallas interpret mode, where the suite's time goes to
XLA compiling one small program per test case: LLVM's backend optimisations are turned off for that
(they make the CPU code faster, which these tests do not need). A GPU run is left untouched.
"""

import os
import sys

_HAS_GPU = os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/kfd")  # before jax is imported
if not _HAS_GPU and "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import pytest  # noqa: E402

ON_GPU = jax.default_backend() == "gpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a GPU (large shapes); skipped elsewhere")


def pytest_collection_modifyitems(config, items):
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a GPU: too large for interpret mode")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    import flash_attn_jax
    return f"jax {jax.__version__}, backend {jax.default_backend()}, kernels {flash_attn_jax.backend_name()}"
