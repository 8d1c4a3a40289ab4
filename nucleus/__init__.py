"""nucleus: an edge runtime for Greengrass V2 recipes."""

__version__ = "0.1.0"
