"""Everything that touches the running kernel: loading (CO-RE or BCC), pinned maps, probes.

BCC (python3-bpfcc) is imported lazily, inside loader.load() only.
"""
