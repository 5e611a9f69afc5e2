"""Every failure a user can act on, as one exception tree with one exit code each.

    HotpathError                 exit 1: an operation failed (the message says which)
     ├── UsageError              exit 2: a bad command-line flag or value
     ├── ConfigError             exit 2: a value that cannot be used; names key and field
     │    └── ConfigFileError    exit 2: `hotpath apply -f`: every problem of the file
     ├── EtcdSettingsError       exit 2: the etcd URL or TLS/auth options cannot be used
     ├── EtcdUnavailable         exit 3: etcd could not be reached or refused the request
     ├── StartupError            exit 4: a process cannot start: port in use, binary missing
     │    └── MissingBinary      exit 4: etcd or envoy neither installed nor on PATH
     ├── ApplyError              exit 1: etcd kept changing while `apply` planned
     ├── HealthTimeout           exit 1: `register --wait-healthy` gave up
     └── BenchError              exit 1: the benchmark could not run a part

Internal conditions that never reach a user (InconsistentSnapshot, LeaseLost) stay beside
the code that raises them. ``hotpath`` prints ``hotpath: <message>`` on one line and exits
with the class's ``exit_code``; it never shows a traceback for these.
"""

from __future__ import annotations


class HotpathError(Exception):
    """Base of every user-facing failure; ``exit_code`` is what ``hotpath`` exits with."""

    exit_code = 1


class UsageError(HotpathError):
    """A command-line flag or value that cannot be used."""

    exit_code = 2


class ConfigError(HotpathError, ValueError):
    """A value (in etcd, a file or a flag) that cannot be used; names the key and field."""

    exit_code = 2

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.reason = message


class ConfigFileError(ConfigError):
    """A config file that cannot be applied; one line per problem, each naming key and field."""

    def __init__(self, path: str, problems: list[str]) -> None:
        listed = "\n".join(f"  {problem}" for problem in problems)
        super().__init__(path, f"{len(problems)} problem(s), nothing written:\n{listed}")
        self.problems = list(problems)


class EtcdSettingsError(HotpathError, ValueError):
    """The etcd URL or TLS/auth options cannot be used."""

    exit_code = 2


class EtcdUnavailable(HotpathError):
    """etcd could not be reached, or refused the request."""

    exit_code = 3


class StartupError(HotpathError):
    """A process cannot start: a port in use, a child that exited while starting."""

    exit_code = 4


class MissingBinary(StartupError):
    """etcd or envoy is neither in this environment nor on PATH."""


class ApplyError(HotpathError):
    """etcd refused the transaction, or kept changing while apply planned."""


class HealthTimeout(HotpathError):
    """`hotpath register --wait-healthy` gave up: the server never answered 200."""


class BenchError(HotpathError):
    """A benchmark part could not start or run."""
