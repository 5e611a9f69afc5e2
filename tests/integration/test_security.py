"""Secured deployments end to end: etcd over TLS with auth, xDS with mutual TLS."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from control_plane.runtime import processes
from control_plane.runtime.bootstrap import XdsClientTls
from control_plane.store.etcd import EtcdSettings
from control_plane.xds import types
from tests.certs import CertificateAuthority
from tests.harness import REPO, Etcd, Upstreams, make_stack, wait_for

pytestmark = pytest.mark.integration


def etcdctl(etcd: Etcd, ca: Path, cert: Path, key: Path, *args: str) -> str:
    result = subprocess.run(
        [processes.find_binary("etcdctl"), "--endpoints", etcd.url, "--cacert", str(ca),
         "--cert", str(cert), "--key", str(key), *args],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_etcd_tls_and_auth_and_xds_mtls_end_to_end(tmp_path: Path,
                                                         upstreams: Upstreams) -> None:
    pki = CertificateAuthority(tmp_path)
    etcd_cert = pki.issue("etcd")
    client = pki.issue("hotpath")
    client_port, peer_port = processes.free_port(), processes.free_port()
    etcd = Etcd(url=f"https://127.0.0.1:{client_port}", data_dir=tmp_path / "etcd",
                client_port=client_port, peer_port=peer_port, log=tmp_path / "etcd.log",
                extra=["--cert-file", str(etcd_cert.cert), "--key-file", str(etcd_cert.key),
                       "--trusted-ca-file", str(pki.path), "--client-cert-auth"])
    # etcd_command advertises http URLs; TLS needs https ones.
    etcd.extra += ["--listen-client-urls", etcd.url, "--advertise-client-urls", etcd.url]
    etcd.start()
    try:
        etcdctl(etcd, pki.path, client.cert, client.key, "user", "add", "root",
                "--new-user-password", "s3cret")
        etcdctl(etcd, pki.path, client.cert, client.key, "auth", "enable")

        xds = pki.issue("control-plane")
        envoy_client = pki.issue("envoy")
        etcd_args = ["--etcd-ca", str(pki.path), "--etcd-cert", str(client.cert),
                     "--etcd-key", str(client.key), "--etcd-user", "root",
                     "--etcd-password", "s3cret"]
        settings = EtcdSettings(urls=etcd.url, prefix="/secure/", ca_file=str(pki.path),
                                cert_file=str(client.cert), key_file=str(client.key),
                                user="root", password="s3cret")
        stack = make_stack(
            tmp_path, etcd.url, "/secure/", etcd=settings,
            extra=[*etcd_args, "--xds-cert", str(xds.cert), "--xds-key", str(xds.key),
                   "--xds-client-ca", str(pki.path)],
            xds_tls=XdsClientTls(ca_file=str(pki.path), cert_file=str(envoy_client.cert),
                                 key_file=str(envoy_client.key)))
        try:
            port = await upstreams.add("a")
            cli = [sys.executable, "-m", "control_plane"]
            common = ["--etcd", etcd.url, "--prefix", "/secure/", *etcd_args]
            for command in (["pool", "put", "p", "--model", "m", *common],
                            ["endpoint", "put", "p", "a", "--address", "127.0.0.1",
                             "--port", str(port), *common]):
                result = await asyncio.to_thread(subprocess.run, cli + command,
                                                 capture_output=True, text=True, timeout=60,
                                                 cwd=REPO)
                assert result.returncode == 0, result.stderr
            await asyncio.to_thread(wait_for, lambda: set(stack.envoy.hosts("p")) == {"a"}, 30,
                                    "Envoy to get the pool over mTLS xDS from a TLS+auth etcd")

            # Without the password etcd refuses the CLI, which says so.
            result = await asyncio.to_thread(
                subprocess.run, cli + ["pool", "list", "--etcd", etcd.url,
                                       "--etcd-ca", str(pki.path), "--etcd-cert",
                                       str(client.cert), "--etcd-key", str(client.key)],
                capture_output=True, text=True, timeout=60, cwd=REPO)
            assert result.returncode == 3 and "etcd" in result.stderr, result.stderr

            # An xDS client without a certificate is refused.
            credentials = grpc.ssl_channel_credentials(root_certificates=pki.path.read_bytes())
            async with grpc.aio.secure_channel(
                    f"127.0.0.1:{stack.control_plane.xds_port}", credentials) as channel:
                stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
                call = stub.StreamAggregatedResources(iter([discovery_pb2.DiscoveryRequest(
                    type_url=types.CLUSTER, node={"id": "intruder"})]))
                with pytest.raises(grpc.aio.AioRpcError):
                    async for _ in call:
                        break
        finally:
            stack.close()
    finally:
        etcd.stop()
