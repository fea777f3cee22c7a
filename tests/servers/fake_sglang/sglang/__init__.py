"""A fake ``sglang`` package for server-lifecycle tests (launch, health wait, teardown, orphans) that must
not pay a real server's start-up: ``python -m sglang.launch_server`` with this folder's parent on
PYTHONPATH runs :mod:`.launch_server` below. Never used to test generation."""
