"""stage layer of ckptsvc (see docs/design.md)."""
