"""emopipe: affective-image datasets to benchmark numbers traceable to the exact data behind them."""

__version__ = "0.1.0"
