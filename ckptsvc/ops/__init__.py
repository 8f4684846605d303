"""ops layer of ckptsvc (see docs/design.md)."""
