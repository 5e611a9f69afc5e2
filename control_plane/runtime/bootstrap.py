"""Envoy bootstrap rendering, local and compose variants from one template."""

from __future__ import annotations

import json
import string
from dataclasses import dataclass

from control_plane.config.model import is_ip
from control_plane.runtime.assets import asset_text
from control_plane.xds.types import ads_api_type


@dataclass(frozen=True)
class XdsClientTls:
    """mTLS from Envoy to the control plane: files as Envoy will see them."""

    ca_file: str
    cert_file: str
    key_file: str


DELTA_DEFAULT = False


@dataclass(frozen=True)
class BootstrapSettings:
    node_id: str = "hotpath-envoy"
    xds_host: str = "127.0.0.1"
    xds_port: int = 18000
    admin_host: str = "127.0.0.1"
    admin_port: int = 9901
    xds_tls: XdsClientTls | None = None
    # ADS flavour: incremental (DELTA_GRPC) or state of the world (GRPC). The control plane
    # serves both on one port; docs/scale.md has the measurements behind the default.
    delta: bool = DELTA_DEFAULT


# The compose variant: control plane by service name, admin on the compose network only.
COMPOSE = BootstrapSettings(node_id="hotpath-envoy", xds_host="control-plane", xds_port=18000,
                            admin_host="0.0.0.0", admin_port=9901)


def _transport_socket(host: str, tls: XdsClientTls | None) -> str:
    if tls is None:
        return ""
    san_type = "IP_ADDRESS" if is_ip(host) else "DNS"
    return f"""      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          sni: {json.dumps(host)}
          common_tls_context:
            alpn_protocols: [h2]
            tls_certificates:
              - certificate_chain: {{filename: {json.dumps(tls.cert_file)}}}
                private_key: {{filename: {json.dumps(tls.key_file)}}}
            validation_context:
              trusted_ca: {{filename: {json.dumps(tls.ca_file)}}}
              match_typed_subject_alt_names:
                - san_type: {san_type}
                  matcher: {{exact: {json.dumps(host)}}}
"""


def render_bootstrap(settings: BootstrapSettings) -> str:
    template = string.Template(asset_text("envoy", "bootstrap.yaml.in"))
    return template.substitute(
        xds_transport_socket=_transport_socket(settings.xds_host, settings.xds_tls),
        ads_api_type=ads_api_type(settings.delta),
        node_id=settings.node_id,
        xds_host=settings.xds_host,
        xds_port=settings.xds_port,
        admin_host=settings.admin_host,
        admin_port=settings.admin_port,
    )
