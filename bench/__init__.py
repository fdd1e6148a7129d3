"""pytest-benchmark suites (run: pytest bench/ --benchmark-only). A package, so its test modules do not clash
with tests/ modules of the same basename when both folders are collected in one run."""
