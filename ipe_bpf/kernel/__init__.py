"""Everything that touches the running kernel: BCC load/attach, pinned maps, BTF, devices.

BCC (python3-bpfcc) is imported lazily, inside loader.load() only.
"""
