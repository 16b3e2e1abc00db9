"""One error hierarchy for the whole project.

Every failure the user can cause is an :class:`IpeBpfError` carrying an errno name
(the kernel IPE's vocabulary: EBADMSG, EINVAL, ERANGE, ENOKEY, ...), a message and,
where it applies, the file and 1-based line it came from.  The CLI turns these into
one-line messages and exit codes; the library never prints.
"""

from __future__ import annotations


class IpeBpfError(Exception):
    """Base of every error ipe-bpf reports to a user."""

    def __init__(
        self,
        errno_name: str,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
    ) -> None:
        super().__init__(message)
        self.errno_name = errno_name
        self.message = message
        self.path = path
        self.line = line

    def located(self, path: str) -> "IpeBpfError":
        """Attach the file name the failing input came from."""
        self.path = path
        return self

    def __str__(self) -> str:
        where = ""
        if self.path is not None:
            where = f"{self.path}:" + (f"{self.line}:" if self.line is not None else "") + " "
        elif self.line is not None:
            where = f"line {self.line}: "
        return f"{where}{self.errno_name}: {self.message}"


class PolicyError(IpeBpfError):
    """The policy text does not parse (EBADMSG, EINVAL, ERANGE)."""


class SignatureError(IpeBpfError):
    """A PKCS#7 envelope is malformed, untrusted or does not verify."""


class LifecycleError(IpeBpfError):
    """A policy lifecycle operation was refused (EEXIST, ESTALE, EPERM, ...)."""


class KernelError(IpeBpfError):
    """The running kernel cannot do what was asked (no BPF LSM, no BTF, ...)."""


class VmError(IpeBpfError):
    """The test VM could not be built or booted."""


class InputError(IpeBpfError):
    """A file named on the command line is no input ipe-bpf reads (a device, far too large)."""


class ServiceError(IpeBpfError):
    """The service (boot unit, audit daemon, its config, log and sinks) cannot do what was asked."""
