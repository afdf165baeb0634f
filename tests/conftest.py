import os

import pytest

# The suite tests the compiled ops: without them the public functions would fall
# back to the reference and the tests would compare the reference with itself.
os.environ.setdefault("BOXLOSS_REQUIRE_EXTENSION", "1")

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


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
