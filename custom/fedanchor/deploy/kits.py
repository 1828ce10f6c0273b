"""Startup kits: provision a project, find each participant's kit, install its local/ files.

    python -m fedanchor.deploy.kits install KIT [--files DIR]

copies the JSON files of DIR into KIT/local/ (default DIR: provision/server for a server kit,
provision/site for a hospital's). ``@WORKSPACE@`` in a file becomes the kit's absolute path: FLARE's
server storage paths must be absolute, and the server's job store belongs inside its workspace, not in
/tmp/nvflare where FLARE's default puts it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

WORKSPACE_TOKEN = "@WORKSPACE@"
# provision/ beside the package in a checkout (editable install), else the working directory's provision/.
REPO_PROVISION = Path(__file__).resolve().parents[3] / "provision"


def provision_dir(explicit: str | Path | None = None) -> Path:
    """The folder with project-loopback.yml, site/ and server/: ``explicit``, the checkout's, or ./provision."""
    for candidate in ([Path(explicit)] if explicit else [REPO_PROVISION, Path.cwd() / "provision"]):
        if (candidate / "site").is_dir() and (candidate / "server").is_dir():
            return candidate.resolve()
    raise FileNotFoundError(f"no provision folder with site/ and server/ at {explicit or REPO_PROVISION}; "
                            "run from the fedanchor checkout or pass the folder explicitly")


@dataclass
class Kits:
    """What one ``nvflare provision`` run wrote: <workspace>/<project>/prod_NN/<participant>/."""

    root: Path
    server: str
    sites: list[str]
    admins: dict[str, str] = field(default_factory=dict)  # user name -> role

    def kit(self, name: str) -> Path:
        path = self.root / name
        if not (path / "startup").is_dir():
            raise FileNotFoundError(f"no startup kit for {name!r} in {self.root}")
        return path

    def admin(self, role: str) -> tuple[str, Path]:
        """The first admin user with ``role`` and their kit."""
        for user, user_role in self.admins.items():
            if user_role == role:
                return user, self.kit(user)
        raise KeyError(f"the project has no admin with role {role!r}; roles: {sorted(set(self.admins.values()))}")


def read_project(path: str | Path) -> dict[str, Any]:
    project = yaml.safe_load(Path(path).read_text())
    if not isinstance(project, dict) or not isinstance(project.get("participants"), list):
        raise ValueError(f"{path} is not a FLARE project file (no participants list)")
    servers = [p for p in project["participants"] if p.get("type") == "server"]
    if len(servers) != 1:
        raise ValueError(f"{path}: expected exactly one server participant, found {len(servers)}")
    return project


def server_of(project: dict[str, Any]) -> dict[str, Any]:
    return next(p for p in project["participants"] if p.get("type") == "server")


def with_port(template: str | Path, out: str | Path, port: int, extra_sites: Sequence[str] = ()) -> Path:
    """A copy of a project file whose server listens on ``port`` (and with extra client sites, for tests)."""
    if not 1024 <= int(port) <= 65535:
        raise ValueError(f"port {port} is outside 1024..65535")
    project = read_project(template)
    server_of(project)["fed_learn_port"] = int(port)
    for name in extra_sites:
        project["participants"].append({"name": name, "type": "client", "org": name.replace("-", "_")})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(project, sort_keys=False))
    return out


def nvflare_command() -> list[str]:
    candidate = Path(sys.executable).with_name("nvflare")
    if candidate.exists():
        return [str(candidate)]
    found = shutil.which("nvflare")
    if not found:
        raise FileNotFoundError("the nvflare command is not installed in this environment: pip install 'nvflare==2.9.*'")
    return [found]


def provision(project_file: str | Path, workspace: str | Path, env: dict[str, str] | None = None) -> Kits:
    """``nvflare provision -p PROJECT -w WORKSPACE``; returns the kits of the newest prod_NN folder."""
    project_file, workspace = Path(project_file).resolve(), Path(workspace).resolve()
    project = read_project(project_file)
    done = subprocess.run(nvflare_command() + ["provision", "-p", str(project_file), "-w", str(workspace), "--force"],
                          capture_output=True, text=True, env=env, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"nvflare provision failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    prods = sorted((workspace / project["name"]).glob("prod_*"), key=lambda p: int(p.name.split("_")[-1]))
    if not prods:
        raise RuntimeError(f"nvflare provision wrote no prod_NN folder under {workspace / project['name']}")
    people = project["participants"]
    return Kits(root=prods[-1], server=server_of(project)["name"],
                sites=[p["name"] for p in people if p.get("type") == "client"],
                admins={p["name"]: p.get("role", "") for p in people if p.get("type") == "admin"})


def is_server_kit(kit: str | Path) -> bool:
    return (Path(kit) / "startup" / "fed_server.json").is_file()


def install_local_files(kit: str | Path, files: str | Path) -> list[Path]:
    """Copy every JSON file of ``files`` into ``kit``/local/, with @WORKSPACE@ replaced by the kit's path."""
    kit, files = Path(kit).resolve(), Path(files)
    if not (kit / "startup").is_dir():
        raise FileNotFoundError(f"{kit} is not a startup kit (no startup/ folder)")
    sources = sorted(files.glob("*.json"))
    if not sources:
        raise FileNotFoundError(f"no JSON files to install in {files}")
    written = []
    for source in sources:
        text = source.read_text().replace(WORKSPACE_TOKEN, str(kit))
        json.loads(text)  # a broken file would only show up when FLARE starts; fail here instead
        target = kit / "local" / source.name
        target.parent.mkdir(exist_ok=True)
        target.write_text(text)
        written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedanchor.deploy.kits",
                                     description="Install fedanchor's local/ files into a provisioned startup kit.")
    sub = parser.add_subparsers(dest="command", required=True)
    install = sub.add_parser("install", help="copy provision/site/*.json (or provision/server/*.json) into KIT/local/")
    install.add_argument("kit", help="a startup kit folder (the one holding startup/ and local/)")
    install.add_argument("--files", default=None,
                         help="folder of JSON files (default: provision/server for a server kit, provision/site otherwise)")
    args = parser.parse_args(argv)
    try:
        files = Path(args.files) if args.files else provision_dir() / ("server" if is_server_kit(args.kit) else "site")
        for path in install_local_files(args.kit, files):
            print(f"wrote {path}")
    except (FileNotFoundError, ValueError) as err:
        print(f"kits: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
