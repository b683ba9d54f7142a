"""blda-posthoc: post-hoc class-bias correction of frozen segmenters by anchor alignment (BLDA)."""

__version__ = "0.1.0"
