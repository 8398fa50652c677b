"""The test suite. A package, so that its helpers import by name (``tests.helpers.data``) with no
``sys.path`` set-up; shared fixtures are in ``conftest.py``."""
