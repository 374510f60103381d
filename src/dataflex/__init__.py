"""DataFlex on Kedro: data-centric dynamic training of language models."""

__version__ = "0.1.0"
