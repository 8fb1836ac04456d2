"""Scorers that may run in another Python environment: stdlib-only modules at import time
(the heavy libraries are imported inside their functions), so that the external child
(``external_child.py``) can import them by path in an environment without pytest-diffeval."""
