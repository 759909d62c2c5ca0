"""Typed configuration: schemas, Hydra registration, validation, and the frozen run config."""
