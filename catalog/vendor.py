"""The browse page's map library, installed from the npm registry into an ignored folder:
``python -m catalog.vendor`` (run by ``make install``).

The pinned release's package tarball is fetched with ``npm pack`` (Debian's npm; the registry is the only
network it needs), checked against the integrity hash the registry publishes for that release (pinned
here: a tarball that differs is refused), and its ``dist/`` files are unpacked into
``catalog/static/vendor/<name>/``, never committed. The page names the library, its version and licence.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VENDOR = Path(__file__).resolve().parent / "static" / "vendor"
LIBRARIES = {
    "leaflet": {
        "version": "1.9.4",
        "integrity": "sha512-nxS1ynzJOmOlHp+iL3FyWqK89GtNL8U8rvlMOsQdTTssxZwCXh8N2NB3GDQOL+YR3XnWyZAxwQixURb+"
        "FA74PA==",
        "license": "BSD-2-Clause",
        "home": "https://leafletjs.com",
    }
}


class VendorError(RuntimeError):
    """The map library cannot be installed (npm missing, registry unreachable, a different tarball)."""


def integrity_of(data: bytes) -> str:
    """The npm registry's ``dist.integrity`` of a tarball (Subresource Integrity, sha512)."""
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def installed(name: str = "leaflet") -> bool:
    lib = LIBRARIES[name]
    stamp = VENDOR / name / "VERSION.json"
    return stamp.is_file() and json.loads(stamp.read_text()).get("integrity") == lib["integrity"]


def install(name: str = "leaflet", tarball: Path | None = None) -> Path:
    """Install library ``name`` (from ``tarball`` when given, else fetched with ``npm pack``); returns its
    folder. Nothing is changed unless the tarball's hash is the pinned one."""
    lib = LIBRARIES[name]
    dest = VENDOR / name
    if tarball is None and installed(name):
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        if tarball is None:
            npm = shutil.which("npm")
            if npm is None:
                raise VendorError("npm is not installed (Debian: apt-get install npm); the map needs it once")
            cmd = [npm, "pack", f"{name}@{lib['version']}", "--json", "--pack-destination", tmp]
            got = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if got.returncode != 0:
                raise VendorError(f"npm pack {name}@{lib['version']} failed: {got.stderr.strip()[-300:]}")
            tarball = Path(tmp) / json.loads(got.stdout)[0]["filename"]
        data = Path(tarball).read_bytes()
        have = integrity_of(data)
        if have != lib["integrity"]:
            raise VendorError(
                f"{Path(tarball).name}: integrity {have[:30]}... differs from the pinned "
                f"{lib['integrity'][:30]}...; refusing it (nothing was installed)"
            )
        staged = Path(tmp) / "staged"
        with tarfile.open(tarball) as tf:
            wanted = ("package/dist/", "package/LICENSE")
            members = [m for m in tf.getmembers() if m.isfile() and m.name.startswith(wanted)]
            tf.extractall(staged, members, filter="data")
        (staged / "package" / "dist" / "VERSION.json").write_text(
            json.dumps({"name": name} | {k: lib[k] for k in ("version", "integrity", "license", "home")})
        )
        if (staged / "package" / "LICENSE").exists():
            shutil.move(staged / "package" / "LICENSE", staged / "package" / "dist" / "LICENSE")
        if dest.exists():
            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged / "package" / "dist"), dest)
    return dest


def main() -> int:
    try:
        for name in LIBRARIES:
            path = install(name)
            print(f"{name} {LIBRARIES[name]['version']} ({LIBRARIES[name]['license']}): {path}")
    except VendorError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
