"""facevae-dist: distributed reproduction of Toledo & Antonelo (2021), face reconstruction with a VAE and face masks."""

__version__ = "0.1.0"
