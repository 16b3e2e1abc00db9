"""Data files copied into the test VM's guest image (package list, PID-1 script)."""
