"""``python -m branchwise.testing.mock_upstream``: serve the mock (see :func:`.server.main`)."""

from .server import main

main()
