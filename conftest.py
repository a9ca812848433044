"""Pytest root marker: tests import `models`, `utils`, `distill`, `engine` from this folder."""
