"""A throwaway self-signed certificate for the sink's TLS modes (tests, local platform).

Made with the `openssl` command line (the venv has no `cryptography` package): an EC P-256
key and a certificate for CN=localhost with subjectAltName IP:127.0.0.1 and DNS:localhost,
valid for a few days, CA:TRUE so that a client can trust it directly as its CA file. The key
is written 0600. Never for production relays: they have real certificates.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# openssl generating one P-256 key and certificate takes milliseconds; this bound guards
# against a hung binary stalling a test session.
_OPENSSL_TIMEOUT_S = 30.0
# Long enough for any test run or demo session; short because the key is throwaway.
_VALID_DAYS = 7


@dataclass(frozen=True)
class Certificate:
    cert: Path  # PEM certificate: the sink's chain and the client's CA file
    key: Path  # PEM private key


def self_signed(directory: Path, name: str = "smtp-sink") -> Certificate:
    """Write <name>.crt and <name>.key under `directory` (created) and return their paths.
    Raises RuntimeError with openssl's message when it is missing or fails."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the openssl command is needed to make a test certificate")
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    command = [
        openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", str(_VALID_DAYS),
        "-subj", "/CN=localhost",
        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "-addext", "basicConstraints=critical,CA:TRUE",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=_OPENSSL_TIMEOUT_S,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"openssl failed: {result.stderr.strip()}")
    key.chmod(0o600)
    return Certificate(cert, key)
