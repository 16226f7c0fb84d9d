"""Test helpers for branchwise (mock upstream model server, fixtures)."""
