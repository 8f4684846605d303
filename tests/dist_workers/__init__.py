"""Rank processes and their launcher for the multi-process tests (gloo on one machine)."""
