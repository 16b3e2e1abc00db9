"""Policy generation: from files, Debian packages or audit records to IPE policy text.

This package writes policies; the kernel layers never import it.
"""
