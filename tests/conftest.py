"""Shared test configuration. Each area keeps its fixtures in its own tests/<area>/conftest.py."""
