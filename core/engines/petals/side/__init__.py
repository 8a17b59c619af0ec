"""Scripts run by a Petals venv's python as subprocesses (`python path/to/script.py ...`), never
imported by the dashboard: they import torch, hivemind and petals, whose pinned dependencies must
stay out of the dashboard's environment. Each prints JSON lines that start with `TORBIZ-JSON `."""
