"""deltaclip installed from its wheel (no checkout, no ini file) migrates a catalog and runs.

An editable install hides packaging mistakes: it reads the checkout, where the ``alembic/``
folder, ``alembic.ini`` and every module are always present. Here the wheel is built from a
clean copy of the working tree, installed into a fresh virtual environment, and the console
script is run from a folder outside the checkout.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from adapters_store.catalog import head_revision
from tests.conftest import checkout_files

ROOT = Path(__file__).resolve().parents[2]
SOURCE_PACKAGES = (
    "adapters_store",
    "deltaclip_api",
    "deltaclip_client",
    "deltaclip_demo",
    "server",
    "trainer",
)


def build_wheel(dest: Path, files: dict[str, str] | None = None) -> Path:
    """Build from a copy, so stale ``build/`` leftovers of the checkout cannot leak in.

    Args:
        files: checkout path → path in the copy; default: every checkout file, in place.
    """
    src = dest / "src"
    chosen = files if files is not None else {name: name for name in checkout_files()}
    for name, placed in chosen.items():
        target = src / placed
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    wheels = dest / "wheels"
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "-w", str(wheels), str(src)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = wheels.glob("deltaclip-*.whl")
    return wheel


def fresh_venv(where: Path, wheel: Path) -> Path:
    """A new environment holding the wheel; the heavy dependencies come from this one.

    ``venv --system-site-packages`` would expose the *base* interpreter's packages, not this
    virtual environment's, so the dependencies are reused through a ``.pth`` line naming this
    environment's site-packages instead. A plain path line does not run the ``.pth`` files of that
    folder, so the editable install of the checkout stays invisible, and the new environment's
    own site-packages (with the wheel) comes first on ``sys.path``.
    """
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
         "--no-index", str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (Path(site) / "deltaclip_test_deps.pth").write_text("".join(f"{p}\n" for p in ours))
    return venv


def test_pyproject_lists_every_package_of_the_checkout() -> None:
    """The package list is explicit (for the migrations mapping), so a new package must join it."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in SOURCE_PACKAGES
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found - listed == set(), "add these packages to pyproject.toml [tool.setuptools]"
    assert config["package-dir"]["adapters_store.migrations"] == "alembic"
    assert (ROOT / "alembic" / "env.py").is_file()


def dockerignored(name: str, patterns: list[str]) -> bool:
    """Whether ``.dockerignore`` excludes the checkout path ``name`` (or a folder above it).

    The patterns this repository uses: a name or glob from the context root, and ``**/`` for any
    depth. Exceptions (``!``) are not used, and refused so that this reading stays complete.
    """
    parts = name.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        assert not pattern.startswith("!"), (
            f".dockerignore exception {pattern!r}: extend this reader"
        )
        anywhere = pattern.removeprefix("**/")
        for prefix in prefixes:
            tail = prefix.rsplit("/", 1)[-1]
            if fnmatch.fnmatchcase(prefix, pattern) or (
                anywhere != pattern and fnmatch.fnmatchcase(tail, anywhere)
            ):
                return True
    return False


def docker_build_files() -> dict[str, str]:
    """Checkout path → path in the image's source folder, for every file the Dockerfile's
    ``COPY`` instructions bring into the build (``.dockerignore`` applied)."""
    ignore = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    files = [name for name in checkout_files() if not dockerignored(name, ignore)]
    chosen: dict[str, str] = {}
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if not line.upper().startswith("COPY "):
            continue
        words = shlex.split(line)
        assert not any(w.startswith("--") for w in words), f"unsupported COPY flags: {line}"
        *sources, dest = words[1:]
        dest = os.path.normpath(dest)
        for source in sources:
            source = os.path.normpath(source)
            if source in files:  # a file: into the destination folder
                chosen[source] = os.path.normpath(os.path.join(dest, Path(source).name))
                continue
            under = [n for n in files if source == "." or n.startswith(source + "/")]
            assert under, f"Dockerfile copies {source!r}, which the checkout does not have"
            for name in under:
                inner = name if source == "." else name[len(source) + 1 :]
                chosen[name] = os.path.normpath(os.path.join(dest, inner))
    return chosen


@pytest.mark.slow
def test_a_wheel_builds_from_exactly_what_the_dockerfile_copies(tmp_path: Path) -> None:
    """The image runs ``pip install .`` on its copied files: a package pyproject.toml lists but
    the Dockerfile does not copy stops the build ("package directory ... does not exist")."""
    files = docker_build_files()
    assert "pyproject.toml" in files and "server/main.py" in files, sorted(files)[:20]
    wheel = build_wheel(tmp_path, files)
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/")[0] for name in zf.namelist() if name.endswith(".py")}
    assert set(SOURCE_PACKAGES) <= tops, tops


@pytest.mark.slow
def test_installed_wheel_migrates_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    venv = fresh_venv(tmp_path, build_wheel(tmp_path))
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("DELTACLIP_DATABASE_URL", "PYTHONPATH")}
    env.update(
        DELTACLIP_HOME=str(tmp_path / "home"),
        DELTACLIP_BASE_MODEL="deltaclip-tiny",
        DELTACLIP_BASE_PRETRAINED="random",
        PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
    )

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            list(args), cwd=work, env=env, capture_output=True, text=True, timeout=240
        )
        assert proc.returncode == 0, proc.stderr
        return proc

    where = json.loads(
        run(str(venv / "bin" / "python"), "-c",
            "import json, importlib.metadata as m, adapters_store, deltaclip_demo, server, trainer;"
            "from adapters_store.catalog import migrations_dir;"
            "print(json.dumps({'modules': [p.__file__ for p in (adapters_store, deltaclip_demo,"
            " server, trainer)], 'migrations': str(migrations_dir()),"
            " 'dist': str(m.distribution('deltaclip').locate_file(''))}))").stdout
    )  # fmt: skip
    site = str(venv.resolve())
    assert all(path.startswith(site) for path in where["modules"]), where
    assert where["migrations"].startswith(site) and where["dist"].startswith(site), where

    deltaclip = str(venv / "bin" / "deltaclip")
    assert "train" in run(deltaclip, "--help").stdout  # plug-in commands from the wheel's metadata
    upgraded = run(deltaclip, "db", "upgrade")
    assert f"catalog at revision {head_revision()}" in upgraded.stdout
    assert (tmp_path / "home" / "catalog.db").is_file()
    current = json.loads(run(deltaclip, "db", "current").stdout)
    assert current == {"current": head_revision(), "head": head_revision(), "up_to_date": True}

    info = json.loads(run(deltaclip, "base", "info").stdout)
    assert info["model"] == "deltaclip-tiny" and info["pretrained"] == "random"
    assert len(info["fingerprint"]) == 64 and int(info["fingerprint"], 16) >= 0
