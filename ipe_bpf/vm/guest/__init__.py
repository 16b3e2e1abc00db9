"""Data files copied into the test VM's guest image: package lists (every line's, and a line's
own additions), the PID-1 script and the `ipe-bpf` wrapper."""
