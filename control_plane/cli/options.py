"""Options and value parsers shared by the `hotpath` subcommands."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable

from control_plane.store.etcd import DEFAULT_ETCD, DEFAULT_PREFIX, EtcdSettings


def host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


def address_or_off(value: str) -> str:
    """HOST:PORT, or '' for off/none (a server that is not started)."""
    if value.lower() in ("", "off", "none"):
        return ""
    host_port(value)
    return value


def at_least(minimum: float, kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value >= minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid ..." message
    return parse


def positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value!r}")
    return number


def urls_from_env(name: str) -> list[str]:
    """An environment variable holding one URL, or several comma-separated."""
    return [u.strip() for u in os.environ.get(name, "").split(",") if u.strip()]


def admin_urls_from_env() -> list[str]:
    """HOTPATH_ADMIN: one Envoy admin URL, or several comma-separated."""
    return urls_from_env("HOTPATH_ADMIN")


def add_etcd_options(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    group = parser.add_argument_group("etcd")
    group.add_argument("--etcd", default=env("HOTPATH_ETCD", DEFAULT_ETCD),
                       help="etcd URL(s), comma-separated (env HOTPATH_ETCD; default %(default)s)")
    group.add_argument("--prefix", default=env("HOTPATH_PREFIX", DEFAULT_PREFIX),
                       help="key prefix (env HOTPATH_PREFIX; default %(default)s)")
    group.add_argument("--etcd-ca", default=env("HOTPATH_ETCD_CA"), help="CA certificate (PEM)")
    group.add_argument("--etcd-cert", default=env("HOTPATH_ETCD_CERT"),
                       help="client certificate (PEM) for mTLS")
    group.add_argument("--etcd-key", default=env("HOTPATH_ETCD_KEY"),
                       help="client key (PEM) for mTLS")
    group.add_argument("--etcd-user", default=env("HOTPATH_ETCD_USER"), help="etcd user")
    group.add_argument("--etcd-password", default=env("HOTPATH_ETCD_PASSWORD"),
                       help="etcd password (prefer the env variable HOTPATH_ETCD_PASSWORD)")


def etcd_settings(args: argparse.Namespace) -> EtcdSettings:
    prefix = args.prefix if args.prefix.endswith("/") else args.prefix + "/"
    return EtcdSettings(urls=args.etcd, prefix=prefix, ca_file=args.etcd_ca,
                        cert_file=args.etcd_cert, key_file=args.etcd_key, user=args.etcd_user,
                        password=args.etcd_password)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("grpc").setLevel(logging.WARNING)
