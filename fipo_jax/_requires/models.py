"""Importing this raises a one-line ImportError unless the 'models' extra is installed."""

from fipo_jax._requires import require

require("models")
