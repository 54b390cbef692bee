"""Command-line helpers that work on the outputs of main.py (run as ``python -m tools.NAME``)."""
