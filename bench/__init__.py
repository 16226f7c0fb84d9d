"""branchwise benchmarks: `make bench` (python -m bench). Not tests: they measure."""
