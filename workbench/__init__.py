"""model-workbench: recipe-driven compression, export and benchmarking of PyTorch models."""

__version__ = "0.1.0"
