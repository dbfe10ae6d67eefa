"""FreeFuse: several subject LoRAs in one image, each kept to its own subject by masks read from attention."""

__version__ = "0.1.0"
