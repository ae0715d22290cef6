"""The wheel a sysadmin installs: built from this tree, installed into a fresh venv
outside the checkout, and used there as the README's install section does.

Slow (about a minute: a build, a venv, pip resolving matplotlib and friends), so it is
marked ``packaging`` and left out of ``./dev test --fast``; ``./dev test`` runs it.
pip installs with ``-c constraints.txt`` (the tested versions) from whatever index
this machine's pip is configured for.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaging

REPO = Path(__file__).resolve().parents[1]
# The test bench: in the repo (testing/consentivr_testbed), never in the wheel.
BENCH_MODULES = ("consentivr/pbx.py", "consentivr/sipcaller.py", "consentivr/testbed.py",
                 "consentivr/cli/demo.py")


def _run(cmd: list[str | Path], cwd: Path, timeout: float = 600) -> str:
    # A clean environment: nothing of this checkout's venv or PYTHONPATH leaks in.
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout, check=False)
    assert result.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {result.returncode}:\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("dist")
    # No --wheel/--sdist: build makes the sdist, then the wheel FROM the sdist, in temp
    # dirs. So the sdist is proven complete, and no stale build/ dir of the checkout
    # can slip an old module into the wheel.
    _run([sys.executable, "-m", "build", "--outdir", out, REPO], cwd=out)
    (wheel,) = out.glob("consentivr-*.whl")
    (sdist,) = out.glob("consentivr-*.tar.gz")
    return wheel, sdist


def test_the_wheel_ships_the_plugin_and_no_test_bench(dists: tuple[Path, Path]) -> None:
    wheel, sdist = dists
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    assert "consentivr/cli/__init__.py" in names and "consentivr/testing.py" in names
    assert {"consentivr/examples/config.yaml", "consentivr/examples/dialplan/minimal.yaml",
            "consentivr/examples/dialplan/gemeente.yaml"} <= names
    assert not names & set(BENCH_MODULES)
    assert not [n for n in names if n.startswith("consentivr_testbed/")]
    with tarfile.open(sdist) as tf:
        sdist_names = tf.getnames()
    top = sdist_names[0].split("/")[0]
    assert f"{top}/src/consentivr/flow.py" in sdist_names
    assert not [n for n in sdist_names if n.endswith(BENCH_MODULES)]


def test_the_installed_wheel_works_outside_the_checkout(
    dists: tuple[Path, Path], tmp_path: Path
) -> None:
    wheel, _ = dists
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    _run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check",
          "-c", REPO / "constraints.txt", wheel], cwd=tmp_path)
    cli = env_dir / "bin" / "consentivr"
    work = tmp_path / "work"
    work.mkdir()

    # It is the installed copy that runs, not this tree.
    where = _run([py, "-c", "import consentivr; print(consentivr.__file__)"], cwd=work)
    assert where.startswith(str(env_dir)), where
    probe = "import importlib.util as u; print(u.find_spec('consentivr_testbed'))"
    assert _run([py, "-c", probe], cwd=work).strip() == "None"

    assert "Usage: consentivr" in _run([cli, "--help"], cwd=work)
    etc = tmp_path / "etc"
    _run([cli, "example-config", "--out", etc], cwd=work)
    for example in ("minimal", "gemeente"):
        _run([cli, "dialplan", "check", etc / "dialplan" / f"{example}.yaml"], cwd=work)
    assert '"$schema"' in _run([cli, "dialplan", "schema"], cwd=work)
    for name in ("ari", "ami"):
        secret = etc / f"{name}.password"
        secret.write_text(f"{name}-s3cret\n")
        secret.chmod(0o600)
    _run([cli, "config", "check", "--config", etc / "config.yaml"], cwd=work)

    # The demo is not in the wheel: one line says where it is.
    demo = subprocess.run([cli, "demo"], cwd=work, capture_output=True, text=True,
                          timeout=60, check=False)
    assert demo.returncode == 1 and "./dev demo" in demo.stderr
    assert len(demo.stderr.strip().splitlines()) == 1, demo.stderr
