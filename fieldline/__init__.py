"""The ``fieldline`` command: composition of edge, cloud and simulators (demo, run, simulate)."""

__version__ = "0.1.0"
