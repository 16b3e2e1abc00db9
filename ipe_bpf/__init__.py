"""ipe-bpf: the IPE integrity policy model enforced through BPF LSM."""

__version__ = "0.1.0"
