"""The prober's command-line options, as `hotpath prober` will parse them."""

from __future__ import annotations

import argparse

import pytest

from control_plane.cli.main import build_parser
from control_plane.cli.serve import prober_settings as settings_from_args
from control_plane.config.model import DEFAULT_SYSTEM_PROMPT
from control_plane.errors import UsageError
from control_plane.prober.service import DEFAULT_IDLE_HORIZON_S, DEFAULT_METRICS
from control_plane.prober.state import Thresholds


def parse(*argv: str) -> argparse.Namespace:
    args = ["prober", *argv]
    return build_parser(args).parse_args(args)


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOTPATH_ADMIN", raising=False)
    settings = settings_from_args(parse())
    assert settings.admin_urls == ()
    assert settings.metrics_address == DEFAULT_METRICS == "127.0.0.1:9102"
    assert settings.idle_horizon_s == DEFAULT_IDLE_HORIZON_S
    assert settings.min_warm is None and settings.min_warm_for("any") is None  # keep all
    assert settings.system_prompt == DEFAULT_SYSTEM_PROMPT
    assert settings.thresholds == Thresholds(rise=2, fall=2)
    assert settings.election and settings.leader_ttl_s == 10
    assert settings.etcd.prefix == "/hotpath/"


def test_every_option() -> None:
    settings = settings_from_args(parse(
        "--etcd", "http://10.0.0.5:2379", "--prefix", "/x",
        "--admin", "http://127.0.0.1:9901", "--admin", "http://127.0.0.1:9902",
        "--metrics", "0.0.0.0:9200", "--idle-horizon", "120", "--min-warm", "2",
        "--min-warm", "chat=1", "--system-prompt", "Be brief.", "--rise", "3", "--fall", "1",
        "--leader-ttl", "4", "--no-election"))
    assert settings.admin_urls == ("http://127.0.0.1:9901", "http://127.0.0.1:9902")
    assert settings.metrics_address == "0.0.0.0:9200"
    assert settings.idle_horizon_s == 120.0
    assert settings.min_warm_for("chat") == 1 and settings.min_warm_for("code") == 2
    assert settings.system_prompt == "Be brief."
    assert settings.thresholds == Thresholds(rise=3, fall=1)
    assert not settings.election and settings.leader_ttl_s == 4
    assert settings.etcd.urls == "http://10.0.0.5:2379" and settings.etcd.prefix == "/x/"


def test_admin_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTPATH_ADMIN", "http://a:9901,http://b:9901")
    assert settings_from_args(parse()).admin_urls == ("http://a:9901", "http://b:9901")
    assert settings_from_args(parse("--admin", "http://c:1")).admin_urls == ("http://c:1",)


def test_metrics_off() -> None:
    assert settings_from_args(parse("--metrics", "off")).metrics_address is None


@pytest.mark.parametrize("argv", [
    ["--metrics", "9102"], ["--min-warm", "x"], ["--min-warm", "chat=-1"],
    ["--idle-horizon", "0"], ["--idle-horizon", "-5"],
])
def test_bad_values_are_refused(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse(*argv)


def test_bad_thresholds_are_refused() -> None:
    with pytest.raises(UsageError, match="--rise: must be >= 1"):
        settings_from_args(parse("--rise", "0"))
