"""Console scripts: efa-train, efa-export (and efa-md)."""
