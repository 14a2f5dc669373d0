"""Test fakes (an OSS-dialect server, a small Kubernetes) and data builders (images, annotation files,
datasets) and the CLI runners the suites share. Tests reach them through fixtures in tests/conftest.py
or import them from here; nothing is imported from a conftest.
"""
