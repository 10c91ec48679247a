"""contimg-publisher: moves finished DSA-110 mosaics from staging to the products archive."""

__version__ = "0.1.0"
