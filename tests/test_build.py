"""The build description: what CMake accepts before any compiler runs."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _cmake() -> str:
    here = Path(sys.executable).parent / "cmake"  # the one make setup installs beside the Python
    found = str(here) if here.exists() else shutil.which("cmake")
    assert found, "cmake is not installed (make setup installs it)"
    return found


@pytest.mark.parametrize("value", ["1", "yes", "CUDA"])
def test_an_unknown_generalist_cuda_value_is_refused_by_name(tmp_path, value):
    """GENERALIST_CUDA is ON, OFF or AUTO (any case): another value stops the configure step,
    instead of building without the CUDA kernels as if it were OFF."""
    done = subprocess.run([_cmake(), "-S", str(ROOT), "-B", str(tmp_path / "build"), f"-DGENERALIST_CUDA={value}"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert f"GENERALIST_CUDA must be ON, OFF or AUTO, got '{value.upper()}'" in done.stdout + done.stderr
