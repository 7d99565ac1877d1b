"""The example language models (examples/lm_*.py) run as a user runs them: each script in a
fresh Python from the repository root, checked by its exit status and its success lines.

Each takes about 21 s of CPU time on a 2-core CPU, 31-43 s wall-clock while other jobs shared
the machine (the time is printed: ``pytest -s``). They need the ``examples`` extra (flax,
equinox, optax); without it they are skipped.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# conftest.py adds these to XLA_FLAGS for the suite (cheaper compiles, simulated devices); the
# examples run without them, as a user's Python would.
SUITE_XLA_FLAGS = ("--xla_backend_optimization_level", "--xla_force_host_platform_device_count",
                   "--xla_gpu_autotune_level")


def example_environment():
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if f.split("=")[0] not in SUITE_XLA_FLAGS]
    env["XLA_FLAGS"] = " ".join(flags)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


@pytest.mark.parametrize("script, framework", [("lm_nnx.py", "flax"),
                                               ("lm_equinox.py", "equinox")])
def test_example_trains_and_decodes(script, framework):
    pytest.importorskip(framework)
    pytest.importorskip("optax")
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(REPO / "examples" / script)], cwd=REPO,
                            env=example_environment(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    print(f"{script}: {seconds:.1f} s\n{result.stdout}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "trained 300 steps" in result.stdout
    assert "KV-cache decoding matches decoding without a cache: same tokens" in result.stdout
