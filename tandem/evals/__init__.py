"""Offline quality evaluations (`tandem eval ...`)."""
