"""Importing this raises a one-line ImportError unless the 'train' extra is installed."""

from fipo_jax._requires import require

require("train")
