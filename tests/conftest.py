"""Shared fixtures. The OSS-dialect test server lives in tests/oss_server.py."""
