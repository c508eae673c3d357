"""Shipped YAML configs, one folder per model family (`slimc configs` lists them)."""
