"""Vendor the view's chart library from npm at build time: ``python -m fieldline.view.vendor``.

uPlot (MIT, a small and fast time-series chart library, actively maintained) is fetched from
the npm registry as the pinned version's tarball, checked against the registry's sha512
integrity pinned here, and its built files are copied into ``fieldline/view/static/vendor/``,
so they ship inside the package and the view works offline (no CDN at run time).
``make setup`` runs this before installing; it does nothing when the files are already there
and match. Standard library only: it runs before the virtualenv has anything in it.

``NPM_CONFIG_REGISTRY`` selects a mirror (the integrity check still applies); ``--tarball``
takes an already downloaded ``.tgz``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import sys
import tarfile
import urllib.request
from pathlib import Path

PACKAGE = "uplot"
VERSION = "1.6.32"
INTEGRITY = ("sha512-KIMVnG68zvu5XXUbC4LQEPnhwOxBuLyW1AHtpm6IKTXImkbLgkMy+jabjLgSLMasNuGG"
             "zQm/ep3tOkyTxpiQIw==")
# file in the package -> name in static/vendor
FILES = {"uPlot.iife.min.js": "package/dist/uPlot.iife.min.js",
         "uPlot.min.css": "package/dist/uPlot.min.css",
         "uPlot.LICENSE": "package/LICENSE"}
TARGET = Path(__file__).resolve().parent / "static" / "vendor"


def _check(data: bytes) -> None:
    algo, _, want = INTEGRITY.partition("-")
    got = base64.b64encode(hashlib.new(algo, data).digest()).decode()
    if got != want:
        raise SystemExit(f"{PACKAGE}-{VERSION}.tgz does not match its pinned integrity "
                         f"({algo} {got} != {want}): refusing to vendor it")


def _download() -> bytes:
    registry = os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org").rstrip("/")
    url = f"{registry}/{PACKAGE}/-/{PACKAGE}-{VERSION}.tgz"
    with urllib.request.urlopen(url, timeout=60) as resp:
        data: bytes = resp.read()
    return data


def stamp() -> Path:
    return TARGET / "VERSION.json"


def current() -> bool:
    try:
        doc = json.loads(stamp().read_text())
    except (OSError, ValueError):
        return False
    return bool(doc.get("integrity") == INTEGRITY
                and all((TARGET / name).is_file() for name in FILES))


def vendor(tarball: Path | None = None) -> list[Path]:
    data = tarball.read_bytes() if tarball else _download()
    _check(data)
    TARGET.mkdir(parents=True, exist_ok=True)
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for name, member in FILES.items():
            f = tar.extractfile(member)
            if f is None:
                raise SystemExit(f"{member} not in {PACKAGE}-{VERSION}.tgz")
            path = TARGET / name
            path.write_bytes(f.read())
            out.append(path)
    stamp().write_text(json.dumps({"package": PACKAGE, "version": VERSION,
                                   "integrity": INTEGRITY}, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fieldline.view.vendor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tarball", type=Path, help=f"a downloaded {PACKAGE}-{VERSION}.tgz")
    ap.add_argument("--force", action="store_true", help="fetch again even if current")
    args = ap.parse_args(argv)
    if current() and not args.force and not args.tarball:
        print(f"{PACKAGE} {VERSION} already vendored in {TARGET}")
        return 0
    paths = vendor(args.tarball)
    print(f"vendored {PACKAGE} {VERSION} ({INTEGRITY[:19]}...): "
          + ", ".join(p.name for p in paths), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
