"""Test configuration.

The suite's time goes to XLA compiling a few programs per test case, so compiling is made cheaper:
without a GPU (Pallas interpret mode) LLVM's backend optimisations are off, and on a GPU XLA does not
autotune the reference's matmuls. Neither changes what is computed. Without a GPU the host platform
also simulates 8 devices, for the mesh tests (tests/test_mesh.py); every other test uses one.
"""

import os
import sys

_HAS_GPU = os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/kfd")  # before jax is imported
_FLAGS = (["--xla_gpu_autotune_level=0"] if _HAS_GPU else
          ["--xla_backend_optimization_level=0", "--xla_force_host_platform_device_count=8"])
for _flag in _FLAGS:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import pytest  # noqa: E402

from flash_attn_jax.kernels import registry  # noqa: E402

ON_GPU = jax.default_backend() == "gpu"
if not ON_GPU:
    # Without a GPU the suite runs the Pallas kernels in interpret mode, as CI always has; the xla
    # backend (the automatic choice there) has its own tests, which choose it.
    registry.set_automatic("xla", False)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drops JAX's caches after each test module. A worker of the CPU suite otherwise keeps every
    program it compiled (some thousands), and late in the run XLA's CPU compiler crashed in two
    runs of 2026-11-30 (consistent with the process's memory-map limit, vm.max_map_count 65530)."""
    yield
    jax.clear_caches()


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
    # FLASH_ATTN_JAX_BACKEND=<name> runs the suite with that backend wherever it applies.
    return (f"jax {jax.__version__}, backend {jax.default_backend()}, kernels "
            f"{flash_attn_jax.backend_name()}, chosen backend {registry.chosen()}")
