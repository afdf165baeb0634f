import os
import shutil
import tempfile

import pytest

# The suite tests the compiled ops: without them the public functions would fall
# back to the reference and the tests would compare the reference with itself.
os.environ.setdefault("BOXLOSS_REQUIRE_EXTENSION", "1")

# torch.compile's caches (FX graphs, AOTAutograd forward/backward pairs) are keyed by the traced forward graph, not by
# the backward ops a custom op registers: an entry left by an earlier build of boxloss on the same machine can replay
# a backward that calls an op this build no longer has.  Each session compiles into its own directory.
_INDUCTOR_CACHE = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _INDUCTOR_CACHE = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="boxloss-tests-inductor-")

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "boxloss",
        deadline=None,
        max_examples=int(os.environ.get("BOXLOSS_HYPOTHESIS_EXAMPLES", "150")),
        suppress_health_check=[HealthCheck.too_slow],
        derandomize=os.environ.get("CI", "") != "",
    )
    settings.load_profile("boxloss")
except ImportError:  # pragma: no cover
    pass


def pytest_unconfigure(config):
    if _INDUCTOR_CACHE is not None:
        shutil.rmtree(_INDUCTOR_CACHE, ignore_errors=True)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")


def pytest_runtest_setup(item):
    """Tests marked ``cuda`` (the tests/*_cuda.py files set ``pytestmark = pytest.mark.cuda``) are skipped
    without a CUDA device, and fail when a device is present but boxloss was built without CUDA kernels."""
    if item.get_closest_marker("cuda") is None:
        return
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import boxloss

    if not boxloss.cuda_kernels_built():
        pytest.fail("a CUDA device is present but boxloss was built without CUDA kernels")


@pytest.fixture
def to_cuda():
    """to_cuda(*tensors): the tensors on the CUDA device (None stays None)."""

    def move(*tensors):
        return [None if t is None else t.to("cuda") for t in tensors]

    return move
