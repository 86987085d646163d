"""tunesmith: fine-tune pre-trained generative models and prove the result is better."""

__version__ = "0.1.0"
