"""Readers and writers: the logits store, the stats file, images, models and reports."""
