"""dodo: distributed experiments for parameter-efficient adaptation of vision-language models."""

__version__ = "0.1.0"
