"""Adapter file format v1: the metadata schema, the safetensors framing checks, the residual
checks and the codec (see docs/FORMAT.md)."""
