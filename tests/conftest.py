"""Shared pytest configuration."""


def pytest_configure(config):
    # GPU tests (tests/test_gpu_kernels.py) carry this marker and skip themselves without CUDA.
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one); run on the device machine")
