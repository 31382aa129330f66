"""Wire formats, signing and the signal store seam (between the pure core and the services)."""
