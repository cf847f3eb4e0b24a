"""Tests of the optional integrations in safetynet.contrib, each skipped when its package is missing."""
