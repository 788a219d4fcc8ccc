"""Data sources, safe download/extraction, image decoding, splitting and augmentation."""
