"""``fieldline edge install`` / ``uninstall``: the agent on a gateway in one command.

Every step is idempotent (a second run changes nothing and says so) and ``--dry-run`` prints
each one without doing it. ``--root`` installs into another root (an image being built, a
test): paths are taken below it, users are created with ``useradd --root`` and systemd is
left alone. The files installed are the shipped ones in ``deploy/`` (from the checkout, or
from ``<prefix>/share/fieldline/deploy`` in a wheel install), with the gateway's own values
written into ``gateway.toml``:

* system user ``fieldline``; ``/etc/fieldline`` (0750, root:fieldline), ``/var/lib/fieldline``
  (0700, fieldline);
* ``/etc/fieldline/gateway.toml`` (0640): gateway id, the cloud broker and its TLS files
  (copied to ``/etc/fieldline/tls``), the registry when given (``devices.csv``), and the agent's
  own login on the gateway broker (a generated password, kept across runs);
* Mosquitto: the drop-in ``conf.d/fieldline-gateway.conf``, the ACL, the agent's user in
  ``/etc/mosquitto/passwd`` (devices get theirs with ``mosquitto_passwd``);
* ``/etc/systemd/system/fieldline-edge.service`` running this installation's ``fieldline``;
  then ``systemctl daemon-reload``, Mosquitto restarted, the agent enabled and started.

``uninstall`` removes all of it; ``--keep-data`` keeps ``/var/lib/fieldline`` (its outbox may
hold results the cloud has not confirmed) and ``--keep-config`` keeps ``/etc/fieldline``.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from devices.errors import ConfigError
from devices.mqtt import parse_broker_url, usable_tls

USER = "fieldline"
BROKER_USER = "fieldline-edge"
CONF = Path("etc/fieldline")
STATE = Path("var/lib/fieldline")
DROPIN = Path("etc/mosquitto/conf.d/fieldline-gateway.conf")
ACL = Path("etc/mosquitto/fieldline-gateway.acl")
PASSWD = Path("etc/mosquitto/passwd")
UNIT = Path("etc/systemd/system/fieldline-edge.service")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def deploy_dir() -> Path:
    """The shipped configs: ``$FIELDLINE_DEPLOY``, the checkout's ``deploy/``, or the wheel's
    ``share/fieldline/deploy``."""
    candidates = [Path(os.environ["FIELDLINE_DEPLOY"])] if "FIELDLINE_DEPLOY" in os.environ else []
    candidates += [Path(__file__).resolve().parent.parent / "deploy",
                   Path(sys.prefix) / "share" / "fieldline" / "deploy"]
    for c in candidates:
        if (c / "gateway.toml").is_file():
            return c
    raise ConfigError("deploy", "the shipped configs are not installed (looked in "
                      + ", ".join(map(str, candidates)) + ")")


@dataclass(frozen=True, kw_only=True)
class InstallOptions:
    gateway_id: str = ""
    cloud: str = ""  # mqtts://host:8883 (or mqtt:// on a trusted network)
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    registry: Path | None = None
    root: Path = Path("/")
    keep_data: bool = False
    keep_config: bool = False
    start: bool = True

    def check(self) -> None:
        if not _ID.match(self.gateway_id):
            raise ConfigError("--gateway-id", "letters, digits, '_', '.', '-' (1 to 64), "
                              f"got {self.gateway_id!r}")
        if not re.match(r"^mqtts?://[^/\s]+$", self.cloud):
            raise ConfigError("--cloud", f"mqtts://host[:port] or mqtt://host[:port], got "
                              f"{self.cloud!r}")
        parse_broker_url(self.cloud, "--cloud")  # the port, as the agent will read it
        tls = self.cloud.startswith("mqtts://")
        for flag, path in (("--ca", self.ca), ("--cert", self.cert), ("--key", self.key)):
            if tls and path is None:
                raise ConfigError(flag, "required with an mqtts:// cloud broker")
            if path is not None and not path.is_file():
                raise ConfigError(flag, f"{path} is not a file")
            if path is not None and not tls:
                raise ConfigError(flag, "only with an mqtts:// cloud broker")
        if tls:  # what the agent checks at start, checked before anything is installed
            flags = {"uplink.ca_file": "--ca", "uplink.cert_file": "--cert",
                     "uplink.key_file": "--key"}
            try:
                usable_tls(parse_broker_url(self.cloud, "--cloud", ca_file=_str(self.ca),
                                            cert_file=_str(self.cert), key_file=_str(self.key)),
                           "uplink")
            except ConfigError as exc:
                raise ConfigError(flags.get(exc.key, exc.key), exc.problem) from None
        if self.registry is not None and not self.registry.is_file():
            raise ConfigError("--registry", f"{self.registry} is not a file")


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


@dataclass
class Step:
    what: str
    apply: Callable[[], bool]  # True: something changed


class Installer:
    def __init__(self, opts: InstallOptions, *, out: Callable[[str], None] = print) -> None:
        self.o = opts
        self.out = out
        self.root = opts.root
        self.system = opts.root == Path("/")
        self.deploy = deploy_dir()

    def p(self, rel: Path) -> Path:
        return self.root / rel

    # ---- helpers ------------------------------------------------------------------------------

    def _ids(self, name: str) -> tuple[int, int] | None:
        try:
            for line in self.p(Path("etc/passwd")).read_text().splitlines():
                f = line.split(":")
                if f[0] == name:
                    return int(f[2]), int(f[3])
        except OSError:
            return None
        return None

    def _own(self, path: Path, owner: str | None, group: str | None, mode: int) -> bool:
        changed = False
        st = path.stat()
        if st.st_mode & 0o7777 != mode:
            path.chmod(mode)
            changed = True
        if os.geteuid() == 0:
            uid = 0 if owner in (None, "root") else (self._ids(owner) or (st.st_uid, 0))[0]
            gid = 0 if group in (None, "root") else (self._ids(group) or (0, st.st_gid))[1]
            if (st.st_uid, st.st_gid) != (uid, gid):
                os.chown(path, uid, gid)
                changed = True
        return changed

    def _dir(self, rel: Path, mode: int, owner: str = "root", group: str = "root") -> Step:
        def apply() -> bool:
            path = self.p(rel)
            made = not path.is_dir()
            path.mkdir(parents=True, exist_ok=True)
            return self._own(path, owner, group, mode) or made
        return Step(f"directory /{rel} ({oct(mode)[2:]}, {owner}:{group})", apply)

    def _file(self, rel: Path, content: Callable[[], bytes], mode: int, owner: str = "root",
              group: str = "root") -> Step:
        def apply() -> bool:
            path = self.p(rel)
            data = content()
            same = path.is_file() and path.read_bytes() == data
            if not same:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(path.name + ".fieldline-new")
                tmp.write_bytes(data)
                tmp.chmod(mode)
                tmp.replace(path)
            return self._own(path, owner, group, mode) or not same
        return Step(f"file /{rel} ({oct(mode)[2:]}, {owner}:{group})", apply)

    def _run(self, what: str, argv: list[str], done: Callable[[], bool] | None = None) -> Step:
        def apply() -> bool:
            if done is not None and done():
                return False
            subprocess.run(argv, check=True, capture_output=True, text=True)
            return True
        return Step(f"{what}: {' '.join(argv)}", apply)

    def _remove(self, rel: Path) -> Step:
        def apply() -> bool:
            path = self.p(rel)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
                return True
            if path.exists() or path.is_symlink():
                path.unlink()
                return True
            return False
        return Step(f"remove /{rel}", apply)

    def _broker_user(self) -> bool:
        try:
            lines = self.p(PASSWD).read_text().splitlines()
        except OSError:
            return False
        return any(line.split(":", 1)[0] == BROKER_USER for line in lines)

    def _systemd(self) -> bool:
        return self.system and self.o.start and Path("/run/systemd/system").is_dir()

    # ---- the configuration ---------------------------------------------------------------------

    def broker_password(self) -> str:
        """The agent's password on the gateway broker: the installed config's, or a new one."""
        if not hasattr(self, "_password"):
            old = re.search(rf'^broker = "mqtt://{BROKER_USER}:([^@"]+)@',
                            _read(self.p(CONF / "gateway.toml")), re.M)
            self._password = old.group(1) if old else secrets.token_urlsafe(18)
        return self._password

    def gateway_toml(self) -> bytes:
        o = self.o
        text = (self.deploy / "gateway.toml").read_text()
        text = set_value(text, "gateway", "id", f'"{o.gateway_id}"')
        if o.registry is not None:
            text = set_value(text, "gateway", "registry", f'"/{CONF}/devices.csv"')
        else:
            text = comment_out(text, "gateway", "registry")
        text = set_value(text, "intake", "broker", f'"mqtt://{BROKER_USER}:'
                                                   f'{self.broker_password()}@127.0.0.1:1883"')
        text = set_value(text, "uplink", "broker", f'"{o.cloud}"')
        for key, path in (("ca_file", o.ca), ("cert_file", o.cert), ("key_file", o.key)):
            if path is not None:
                text = set_value(text, "uplink", key, f'"/{CONF}/tls/{_tls_name(key)}"')
        head = (f"# Written by `fieldline edge install --gateway-id {o.gateway_id}`: rerun it to "
                "change these values, or edit\n# this file (a rerun keeps edits only to keys it "
                "does not set).\n")
        return (head + text).encode()

    # ---- plans ---------------------------------------------------------------------------------

    def install_plan(self) -> list[Step]:
        o = self.o
        o.check()
        steps: list[Step] = []
        steps.append(self._run(
            f"system user {USER}",
            ["useradd", "--system", "--user-group", "--home-dir", f"/{STATE}",
             "--no-create-home", "--shell", "/usr/sbin/nologin",
             *([] if self.system else ["--root", str(self.root.resolve())]), USER],
            done=lambda: self._ids(USER) is not None))
        steps += [self._dir(CONF, 0o750, "root", USER),
                  self._dir(CONF / "tls", 0o750, "root", USER),
                  self._dir(STATE, 0o700, USER, USER)]
        for key, path in (("ca_file", o.ca), ("cert_file", o.cert), ("key_file", o.key)):
            if path is not None:
                steps.append(self._file(CONF / "tls" / _tls_name(key), path.read_bytes,
                                        0o640, "root", USER))
        if o.registry is not None:
            steps.append(self._file(CONF / "devices.csv", o.registry.read_bytes, 0o640, "root",
                                    USER))
        steps.append(self._file(CONF / "gateway.toml", self.gateway_toml, 0o640, "root", USER))
        d = self.deploy
        steps += [self._file(DROPIN, (d / "mosquitto" / "gateway.conf").read_bytes, 0o644),
                  self._file(ACL, (d / "mosquitto" / "gateway.acl").read_bytes, 0o644),
                  self._file(PASSWD, lambda: _read(self.p(PASSWD)).encode(), 0o640, "root",
                             "mosquitto" if self._ids("mosquitto") else "root")]
        steps.append(Step(
            f"broker user {BROKER_USER} in /{PASSWD} (mosquitto_passwd -b)",
            self._add_broker_user))
        steps.append(self._file(UNIT, self.unit, 0o644))
        if self._systemd():
            steps += [self._run("reload systemd", ["systemctl", "daemon-reload"]),
                      self._run("restart Mosquitto", ["systemctl", "restart", "mosquitto"]),
                      self._run("start the agent",
                                ["systemctl", "enable", "--now", "fieldline-edge"])]
        return steps

    def _add_broker_user(self) -> bool:
        if self._broker_user() and self.p(CONF / "gateway.toml").is_file():
            return False  # the password in the config is the one in the broker's file
        subprocess.run(["mosquitto_passwd", "-b", str(self.p(PASSWD)), BROKER_USER,
                        self.broker_password()], check=True, capture_output=True, text=True)
        return True

    def _drop_broker_user(self) -> bool:
        path = self.p(PASSWD)
        changed = False
        if self._broker_user():
            subprocess.run(["mosquitto_passwd", "-D", str(path), BROKER_USER], check=True,
                           capture_output=True, text=True)
            changed = True
        if path.is_file() and not path.read_text().strip():
            path.unlink()
            changed = True
        return changed

    def unit(self) -> bytes:
        text = (self.deploy / "systemd" / "fieldline-edge.service").read_text()
        mine = Path(sys.prefix) / "bin" / "fieldline"  # this installation's, not the PATH's
        exe = str(mine) if mine.exists() else (shutil.which("fieldline") or str(mine))
        return re.sub(r"^ExecStart=\S+", f"ExecStart={exe}", text, flags=re.M).encode()

    def uninstall_plan(self) -> list[Step]:
        steps: list[Step] = []
        if self._systemd():
            steps.append(self._run("stop the agent",
                                   ["systemctl", "disable", "--now", "fieldline-edge"],
                                   done=lambda: not self.p(UNIT).exists()))
        steps += [self._remove(UNIT), self._remove(DROPIN), self._remove(ACL)]
        steps.append(Step(f"broker user {BROKER_USER} out of /{PASSWD} (mosquitto_passwd -D; "
                          "the file too once nobody else is in it)", self._drop_broker_user))
        if not self.o.keep_config:
            steps.append(self._remove(CONF))
        if not self.o.keep_data:
            steps.append(self._remove(STATE))
        if not (self.o.keep_data or self.o.keep_config):
            steps.append(self._run(
                f"system user {USER}",
                ["userdel", *([] if self.system else ["--root", str(self.root.resolve())]),
                 USER], done=lambda: self._ids(USER) is None))
        if self._systemd():
            steps += [self._run("reload systemd", ["systemctl", "daemon-reload"]),
                      self._run("restart Mosquitto", ["systemctl", "restart", "mosquitto"])]
        return steps

    def run(self, steps: list[Step], *, dry_run: bool) -> int:
        changed = 0
        for s in steps:
            if dry_run:
                self.out(f"would: {s.what}")
                continue
            did = s.apply()
            changed += did
            self.out(f"{'done' if did else 'unchanged'}: {s.what}")
        return changed


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _tls_name(key: str) -> str:
    return {"ca_file": "ca.crt", "cert_file": "gateway.crt", "key_file": "gateway.key"}[key]


def _section(text: str, section: str) -> tuple[int, int]:
    m = re.search(rf"^\[{re.escape(section)}\][^\n]*\n", text, re.M)
    if m is None:
        raise ValueError(f"[{section}] not in gateway.toml")
    nxt = re.search(r"^\[", text[m.end():], re.M)
    return m.end(), m.end() + nxt.start() if nxt else len(text)


def set_value(text: str, section: str, key: str, literal: str) -> str:
    """``key = literal`` in ``[section]``, in place of the key's line (set or commented out, its
    comment kept), or after the header."""
    a, b = _section(text, section)
    body = text[a:b]
    pat = re.compile(rf"^#?[ \t]*{re.escape(key)}[ \t]*=[ \t]*(\"[^\"\n]*\"|\S+)([ \t]*)(#.*)?$",
                     re.M)
    m = pat.search(body)
    if m:
        new = f"{key} = {literal}"
        if m.group(3):
            new = new.ljust(max(len(new) + 1, m.start(3) - m.start())) + m.group(3)
        body = body[:m.start()] + new + body[m.end():]
    else:
        body = f"{key} = {literal}\n" + body
    return text[:a] + body + text[b:]


def comment_out(text: str, section: str, key: str) -> str:
    a, b = _section(text, section)
    body = re.sub(rf"^({re.escape(key)}[ \t]*=)", r"# \1", text[a:b], count=1, flags=re.M)
    return text[:a] + body + text[b:]
