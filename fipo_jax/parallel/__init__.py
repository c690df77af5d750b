"""Parallelism: the mesh and the one sharding rules table (`sharding`), multi-host helpers (`distributed`)."""
