"""Self-signed certificates for Triton's gRPC endpoint over TLS (`make tls-certs`), made with openssl.

    python -m serve.tls                          # build/tls/: a CA, a server and a client certificate
    python -m serve.tls --force                  # new ones, even if the present ones are valid
    python -m serve.tls --host triton.example.org --host 10.0.0.7   # more names in the server certificate
    docker compose -f docker-compose.yml -f docker-compose.tls.yml --profile slim up -d --wait   # serve with them
    python -m client --ssl --root-certificates build/tls/ca.crt     # a client that trusts the CA

What it writes in --out (the directory 0700, keys 0600, certificates 0644; EC P-256 keys, SHA-256):
  ca.crt, ca.key          a CA of its own (CN "charrnn-triton local CA"); clients trust ca.crt
                          (--root-certificates); ca.key only signs and never leaves the directory
  server.crt, server.key  the server's certificate, for localhost, 127.0.0.1, ::1 and the compose service
                          names (triton-slim, triton-slim-stream, triton, triton-cpu, triton-stream), plus --host;
                          Triton's --grpc-server-cert / --grpc-server-key
  client.crt, client.key  a client certificate for mutual TLS (--grpc-use-ssl-mutual=true):
                          the client's --certificate-chain / --private-key
A second run keeps valid files ("up to date": every certificate verifies against ca.crt, none expires within
a day, the server's names are the ones asked for); --force makes new ones.

The server reads server.key as uid 1000 (triton-server, the images' user), and a 0600 key is readable by its
owner only. So server.key is given to --server-uid (default 1000): when this runs as root it chowns the key;
run as that uid, the key is its own already; any other user is refused before anything is written (exit 2).
Compose mounts each file on its own, read-only, so the 0700 directory does not stand in the way. The other
keys stay the invoking user's.

Progress goes to stderr; stdout gets the directory. Exit codes: 0 ok, 2 bad input (--days, --host,
--server-uid this user cannot give the key to), 3 openssl missing or failing.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from charrnn.cli import parser
from charrnn.errors import UnavailableError, UserError, cli

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "build" / "tls"
SERVER_UID = 1000  # triton-server in serve/Dockerfile.slim and NVIDIA's images
# The names a client may dial: loopback, and the compose services' names on the compose network.
DEFAULT_HOSTS = (
    "localhost",
    "127.0.0.1",
    "::1",
    "triton-slim",
    "triton-slim-stream",
    "triton",
    "triton-cpu",
    "triton-stream",
)
KEYS = ("ca.key", "server.key", "client.key")
CERTS = ("ca.crt", "server.crt", "client.crt")
CA_NAME = "charrnn-triton local CA"
HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9-]{1,63})*$")

# openssl's own configuration, so that the system's openssl.cnf (whatever its defaults) plays no part.
CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
subjectAltName = {san}
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def san_entries(hosts: list[str]) -> list[str]:
    """subjectAltName entries (`DNS:name`, `IP:address`), duplicates dropped; UserError for a bad name."""
    out: list[str] = []
    for host in hosts:
        try:
            entry = f"IP:{ipaddress.ip_address(host)}"
        except ValueError:
            if not HOST_NAME.match(host):
                raise UserError("--host", f"not a host name or IP address: {host!r}") from None
            entry = f"DNS:{host.lower()}"
        if entry not in out:
            out.append(entry)
    return out


def openssl(*args: str, what: str) -> str:
    """Run `openssl <args>` (an argument list, no shell); its stdout, or UnavailableError with its stderr."""
    exe = shutil.which("openssl")
    if exe is None:
        raise UnavailableError(
            "openssl", "not found on PATH", "install it, e.g. apt-get install openssl"
        )
    r = subprocess.run([exe, *args], capture_output=True, text=True, check=False, timeout=120)
    if r.returncode != 0:
        raise UnavailableError(f"openssl {args[0]}", f"{what} failed: {r.stderr.strip()[-800:]}")
    return r.stdout


def cert_sans(cert: Path) -> set[str]:
    """The certificate's subjectAltName entries, in san_entries()'s spelling."""
    text = openssl("x509", "-in", str(cert), "-noout", "-ext", "subjectAltName", what="reading")
    out = set()
    for item in text.split("\n", 1)[-1].split(","):
        kind, _, value = item.strip().partition(":")
        if kind == "DNS":
            out.add(f"DNS:{value.lower()}")
        elif kind == "IP Address":
            out.add(f"IP:{ipaddress.ip_address(value)}")
    return out


def up_to_date(out: Path, sans: list[str]) -> bool:
    """Every file there, both leaf certificates signed by ca.crt, none expiring within a day, the names asked."""
    if not all((out / name).is_file() for name in KEYS + CERTS):
        return False
    try:
        for cert in CERTS:
            openssl(
                "x509", "-in", str(out / cert), "-noout", "-checkend", "86400", what="expiry check"
            )
        openssl(
            "verify",
            "-CAfile",
            str(out / "ca.crt"),
            str(out / "server.crt"),
            str(out / "client.crt"),
            what="verification",
        )
        return cert_sans(out / "server.crt") == set(sans)
    except UnavailableError:
        return False


def key_owner(server_uid: int) -> int | None:
    """The uid to chown server.key to (None: it is already the invoking user's); UserError when impossible."""
    euid = os.geteuid()
    if euid == server_uid:
        return None
    if euid == 0:
        return server_uid
    raise UserError(
        "--server-uid",
        f"the server runs as uid {server_uid} and must read server.key (mode 0600), but uid {euid} "
        "cannot give a file away",
        f"run as root (sudo make tls-certs) or as uid {server_uid}, or pass --server-uid {euid} "
        "if the server runs as you",
    )


def make_certificates(out: Path, sans: list[str], days: int, server_uid: int) -> None:
    """A CA, a server and a client certificate in `out` (written next to the old files, then moved in)."""
    owner = key_owner(server_uid)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    old_umask = os.umask(0o077)
    try:
        with tempfile.TemporaryDirectory(dir=out, prefix=".new-") as tmp:
            work = Path(tmp)
            config = work / "openssl.cnf"
            config.write_text(CONFIG.format(san=", ".join(sans)))
            cfg = ["-config", str(config)]
            for key in KEYS:
                openssl(
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-out",
                    str(work / key),
                    what=f"generating {key}",
                )
            log(f"tls: keys generated (EC P-256): {', '.join(KEYS)}")
            openssl(
                "req",
                "-new",
                "-x509",
                *cfg,
                "-extensions",
                "ca",
                "-key",
                str(work / "ca.key"),
                "-subj",
                f"/CN={CA_NAME}",
                "-sha256",
                "-days",
                str(days),
                "-set_serial",
                f"0x{secrets.token_hex(16)}",
                "-out",
                str(work / "ca.crt"),
                what="the CA certificate",
            )
            log(f"tls: CA certificate ca.crt ({CA_NAME!r}, {days} days)")
            for leaf, cn in (("server", "charrnn-triton server"), ("client", "charrnn-client")):
                openssl(
                    "req",
                    "-new",
                    *cfg,
                    "-key",
                    str(work / f"{leaf}.key"),
                    "-subj",
                    f"/CN={cn}",
                    "-out",
                    str(work / f"{leaf}.csr"),
                    what=f"the {leaf} request",
                )
                openssl(
                    "x509",
                    "-req",
                    "-in",
                    str(work / f"{leaf}.csr"),
                    "-CA",
                    str(work / "ca.crt"),
                    "-CAkey",
                    str(work / "ca.key"),
                    "-set_serial",
                    f"0x{secrets.token_hex(16)}",
                    "-sha256",
                    "-days",
                    str(days),
                    "-extfile",
                    str(config),
                    "-extensions",
                    leaf,
                    "-out",
                    str(work / f"{leaf}.crt"),
                    what=f"signing the {leaf} certificate",
                )
            log(f"tls: server.crt for {', '.join(sans)}; client.crt (mutual TLS), signed by the CA")
            openssl(
                "verify",
                "-CAfile",
                str(work / "ca.crt"),
                str(work / "server.crt"),
                str(work / "client.crt"),
                what="verification",
            )
            for key in KEYS:
                os.chmod(work / key, 0o600)
            for cert in CERTS:
                os.chmod(work / cert, 0o644)
            if owner is not None:
                os.chown(work / "server.key", owner, -1)
            for name in KEYS + CERTS:
                os.replace(work / name, out / name)
    finally:
        os.umask(old_umask)
    whose = f"uid {owner}" if owner is not None else f"uid {os.geteuid()}, this user"
    log(f"tls: wrote {out} (0700): keys 0600, certificates 0644; server.key belongs to {whose}")


@cli
def main(argv: list[str] | None = None) -> int:
    p = parser("python -m serve.tls", __doc__)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the files")
    p.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help=f"another DNS name or IP address for the server certificate (repeatable; always: "
        f"{', '.join(DEFAULT_HOSTS)})",
    )
    p.add_argument("--days", type=int, default=365, help="validity of the certificates")
    p.add_argument(
        "--server-uid",
        type=int,
        default=SERVER_UID,
        help="uid the server runs as, to which server.key is given (the images' triton-server)",
    )
    p.add_argument("--force", action="store_true", help="new files even if the present are valid")
    args = p.parse_args(argv)
    if not 1 <= args.days <= 3650:
        raise UserError("--days", f"must be in 1..3650, got {args.days}")
    if args.server_uid < 0:
        raise UserError("--server-uid", f"must be >= 0, got {args.server_uid}")
    sans = san_entries([*DEFAULT_HOSTS, *args.host])
    out = args.out.resolve()
    if not args.force and up_to_date(out, sans):
        # the modes and the key's owner, as make_certificates() sets them
        owner = key_owner(args.server_uid)
        os.chmod(out, 0o700)
        for name in KEYS + CERTS:
            os.chmod(out / name, 0o600 if name in KEYS else 0o644)
        if owner is not None and (out / "server.key").stat().st_uid != owner:
            os.chown(out / "server.key", owner, -1)
            log(f"tls: server.key given to uid {owner}")
        log(f"tls: {out}: up to date (valid for a day at least; --force makes new ones)")
    else:
        make_certificates(out, sans, args.days, args.server_uid)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
