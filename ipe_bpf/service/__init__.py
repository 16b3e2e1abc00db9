"""ipe-bpf as a service: enforcement from boot, and decision records that are never silently lost.

- :mod:`.config`    /etc/ipe-bpf/ipe-bpf.conf
- :mod:`.serials`   one serial sequence per boot, shared by every ipe-bpf process
- :mod:`.records`   the record lines (kernel IPE's, and the service's own); reading them back
- :mod:`.durable`   the durable log: one locked writer, rotation, crash safety; tail -F readers
- :mod:`.control`   how the lifecycle and load/unload hand their records to the daemon
- :mod:`.source`    the pinned ring buffer, read without consuming
- :mod:`.daemon`    ``ipe-bpf auditd``: ring buffer -> durable log, exactly once
- :mod:`.followers` durable log -> each sink, at most once, every loss recorded
- :mod:`.journal`, :mod:`.netlink`   the journald and kernel-audit sinks
- :mod:`.systemd`   the units, ``ipe-bpf service install|uninstall|status``, sd_notify
- :mod:`.tail`      ``audit tail`` from the durable log while the daemon runs

docs/service.md describes the whole; each module's docstring its part.
"""
