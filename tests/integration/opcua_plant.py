"""A real asyncua OPC-UA server for the gateway tests: one node per (asset, modality),
values changing on a schedule with source timestamps, optional Basic256Sha256 security
with certificates the test generates. It runs on its own event loop in a thread, can be
stopped and started again on the same port (a server restart), and records every value
it wrote."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import tempfile
import threading
from pathlib import Path

import numpy as np

from streamfuse.sim.plant import Plant, PlantConfig

MODALITIES = ("image", "audio", "series")
NAMESPACE = "urn:streamfuse:test-plant"
SHELF = Path(tempfile.gettempdir()) / f"streamfuse-test-opcua-{os.getuid()}-aspace"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certificates(root: Path, client_uri: str) -> dict[str, Path]:
    """A self-signed server and client certificate (DER) and keys (PEM), as OPC-UA wants them."""
    from asyncua.crypto.cert_gen import (dump_private_key_as_pem, generate_private_key,
                                         generate_self_signed_app_certificate)
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import ExtendedKeyUsageOID

    root.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    out = {}
    for who, uri, usage in (("server", "urn:streamfuse:test-plant:server", ExtendedKeyUsageOID.SERVER_AUTH),
                            ("client", client_uri, ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = generate_private_key()
        cert = generate_self_signed_app_certificate(
            key, f"streamfuse test {who}", {}, [x509.UniformResourceIdentifier(uri), x509.DNSName(host)], [usage])
        (root / f"{who}.der").write_bytes(cert.public_bytes(Encoding.DER))
        (root / f"{who}-key.pem").write_bytes(dump_private_key_as_pem(key))
        out[f"{who}_cert"], out[f"{who}_key"] = root / f"{who}.der", root / f"{who}-key.pem"
    trusted = root / "trusted"
    trusted.mkdir(exist_ok=True)
    (trusted / "client.der").write_bytes(out["client_cert"].read_bytes())
    out["trusted"] = trusted
    return out


def node_id(asset: str, modality: str) -> str:
    return f"ns=2;s={asset}.{modality}"


class PlantServer:
    """The server; ``written`` holds every (asset, modality, source time ms) it published.

    Args:
        port: TCP port (the same across restarts).
        start_ms: source time of slot 0; slot ``k`` is ``start_ms + k * period_ms``.
        period_ms: event time between two slots.
        tick_s: wall time between two slots (event time may run faster).
        certs: from :func:`make_certificates` for Basic256Sha256 endpoints only; None = no security.
        modes: which Basic256Sha256 modes to offer: ``Sign``, ``SignAndEncrypt``.
    """

    def __init__(self, port: int, start_ms: int, period_ms: int, tick_s: float, certs: dict | None = None,
                 modes: tuple[str, ...] = ("SignAndEncrypt",), assets: int = 2) -> None:
        self.port, self.start_ms, self.period_ms, self.tick_s = port, start_ms, period_ms, tick_s
        self.certs, self.modes = certs, modes
        self.assets = [f"asset-{i}" for i in range(assets)]
        self.plant = Plant(PlantConfig(assets=assets, lines=2, seed=11), start_ms=start_ms)
        self.written: list[tuple[str, str, int]] = []
        self.url = f"opc.tcp://127.0.0.1:{port}/streamfuse/"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._slot = 0
        self._t0: float | None = None

    # ------------------------------------------------------------- control (test thread)

    def start(self) -> PlantServer:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        ready.set()
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop = None

    # ------------------------------------------------------------- on the server's loop

    async def _start(self) -> None:
        from asyncua import Server, ua

        server = Server()
        # The standard address space, cached on disk after the first start (building it takes seconds).
        await server.init(shelf_file=SHELF)
        if not SHELF.exists() and Path(f"{SHELF}.dat").exists():
            SHELF.touch()  # asyncua looks for the bare name; Python's dbm.dumb writes .dat/.dir beside it
        server.set_endpoint(self.url)
        await server.set_application_uri("urn:streamfuse:test-plant:server")
        if self.certs is not None:
            await self._secure(server)
        idx = await server.register_namespace(NAMESPACE)
        folder = await server.nodes.objects.add_folder(idx, "plant")
        self.nodes = {}
        for asset in self.assets:
            for m in MODALITIES:
                nid = ua.NodeId(f"{asset}.{m}", idx)
                empty = ua.Variant([0.0], ua.VariantType.Float) if m == "series" else \
                    ua.Variant(b"", ua.VariantType.ByteString)
                node = self.nodes[(asset, m)] = await folder.add_variable(nid, f"{asset}.{m}", empty)
                # Until the first reading, the value is not there yet (as real servers say).
                await node.write_value(ua.DataValue(empty, StatusCode=ua.StatusCode(
                    ua.StatusCodes.BadWaitingForInitialData)))
        await server.start()
        self.server = server
        self._writer = asyncio.create_task(self._write_loop())

    async def _secure(self, server) -> None:
        from asyncua import ua
        from asyncua.crypto.truststore import TrustStore
        from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions

        policies = {"Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
                    "SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt}
        server.set_security_policy([policies[m] for m in self.modes])
        await server.load_certificate(str(self.certs["server_cert"]))
        await server.load_private_key(str(self.certs["server_key"]))
        store = TrustStore([self.certs["trusted"]], [])
        await store.load()
        server.set_certificate_validator(CertificateValidator(
            CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_CLIENT, store))

    async def _stop(self) -> None:
        self._writer.cancel()
        try:
            await self._writer
        except asyncio.CancelledError:
            pass  # we cancelled it
        await self.server.stop()

    async def _write_loop(self) -> None:
        """Slot ``k`` is written at wall time ``t0 + k * tick_s``; slots due while the
        server was down are never written (the device's readings in that time are lost)."""
        loop = asyncio.get_running_loop()
        if self._t0 is None:
            self._t0 = loop.time()
        while True:
            due = int((loop.time() - self._t0) / self.tick_s)
            self._slot = max(self._slot, due)
            await self._write_slot(self._slot)
            self._slot += 1
            await asyncio.sleep(max(0.0, self._t0 + self._slot * self.tick_s - loop.time()))

    async def _write_slot(self, k: int) -> None:
        from asyncua import ua

        ts = self.start_ms + k * self.period_ms
        stamp = dt.datetime.fromtimestamp(ts / 1000, dt.timezone.utc)
        for i, asset in enumerate(self.assets):
            sample, _ = self.plant.sample(i, k, ts)
            for m in MODALITIES:
                payload = sample.readings[m].payload
                if m == "series":  # a vibration window as an OPC-UA Float array
                    variant = ua.Variant(np.frombuffer(payload, "<f4").tolist(), ua.VariantType.Float)
                else:
                    variant = ua.Variant(payload, ua.VariantType.ByteString)
                await self.nodes[(asset, m)].write_value(ua.DataValue(variant, SourceTimestamp=stamp,
                                                                      ServerTimestamp=stamp))
                self.written.append((asset, m, ts))
