"""Audit: decode the BPF ring buffer's records and render them as IPE 1420 text or JSON."""
