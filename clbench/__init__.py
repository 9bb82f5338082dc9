"""clbench: continual-learning benchmarks on Avalanche."""

__version__ = "0.1.0"
