"""A throwaway certificate authority for TLS tests (openssl): a CA, server and client
certificates, and an empty CRL, in a temporary directory."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Pki:
    dir: Path

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def crl(self) -> Path:
        return self.dir / "crl.pem"

    def cert(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.crt", self.dir / f"{name}.key"


def make_pki(d: Path, *, server: str = "server", clients: tuple[str, ...] = ()) -> Pki:
    """CA; ``server`` (CN 127.0.0.1, SAN IP 127.0.0.1); one client certificate per CN."""
    d.mkdir(parents=True, exist_ok=True)
    _run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
         "-subj", "/CN=fieldline test CA", "-days", "2", cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, cn, ext in [(server, "127.0.0.1", True), *((c, c, False) for c in clients)]:
        _run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
        _run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2",
             *(["-extfile", "san.ext"] if ext else []), cwd=d)
    (d / "index.txt").write_text("")
    (d / "crlnumber").write_text("01\n")
    (d / "ca.cnf").write_text(f"""[ca]
default_ca = test
[test]
database = {d}/index.txt
crlnumber = {d}/crlnumber
default_md = sha256
default_crl_days = 2
""")
    _run("ca", "-config", "ca.cnf", "-gencrl", "-keyfile", "ca.key", "-cert", "ca.crt", "-out",
         "crl.pem", cwd=d)
    return Pki(d)


def revoke(pki: Pki, name: str) -> None:
    """Revoke ``name``'s certificate and re-issue the CRL (as an operator does for a stolen
    gateway)."""
    _run("ca", "-config", "ca.cnf", "-revoke", f"{name}.crt", "-keyfile", "ca.key", "-cert",
         "ca.crt", cwd=pki.dir)
    _run("ca", "-config", "ca.cnf", "-gencrl", "-keyfile", "ca.key", "-cert", "ca.crt", "-out",
         "crl.pem", cwd=pki.dir)
