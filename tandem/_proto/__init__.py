"""Builds the Python code of `protos/tandem/v1/*.proto` into `tandem/v1/` (see `build.py`)."""
