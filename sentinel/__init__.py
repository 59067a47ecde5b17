"""sentinel: an observability and SLO agent for deployed DenseNet image classifiers.

The package root imports nothing heavy: the CLI's help and the sidecar's hot path
must not pull in torch, onnxruntime or scipy.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
