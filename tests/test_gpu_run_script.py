"""bench/gpu_run.sh, the one-call GPU script: its default test step runs every test file that holds GPU tests (until
2026-12-03 it left out test_argmax.py's 19, which then ran only in calls that named them)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _default_test_files() -> set[str]:
    script = open(os.path.join(ROOT, "bench", "gpu_run.sh")).read().replace("\\\n", " ")
    m = re.search(r"\$\{TEST_FILES:-([^}]*)\}", script)
    assert m, "gpu_run.sh: no ${TEST_FILES:-...} default found"
    return set(m.group(1).split())


def _files_with_gpu_tests() -> set[str]:
    tests = os.path.join(ROOT, "tests")
    own = os.path.basename(__file__)  # this file names the marker without using it
    return {f"tests/{name}" for name in sorted(os.listdir(tests))
            if name.startswith("test_") and name.endswith(".py") and name != own
            and "pytest.mark.gpu" in open(os.path.join(tests, name)).read()}


def test_default_test_step_covers_every_gpu_test_file():
    listed, wanted = _default_test_files(), _files_with_gpu_tests()
    assert wanted, "no GPU-marked test file found"
    assert listed == wanted, f"gpu_run.sh's default TEST_FILES: missing {sorted(wanted - listed)}, " \
                             f"not GPU tests {sorted(listed - wanted)}"
