"""The runtime folder holds the control sockets: a folder someone else prepared is refused.

``sendguard run`` is started for real on a configuration whose
``cluster.runtime_dir`` was made beforehand in a hostile way; it must exit 2
with one line naming the key, before any process or socket exists. So must
``sendguard check-config``, which the service runs before the start.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from cluster.supervisor import UnsafeRuntimeDir, make_private_dir

TENANTS = '[domains."kowalski.pl"]\n'


def config(folder: Path, runtime: Path) -> Path:
    (folder / "tenants.toml").write_text(TENANTS)
    path = folder / "sendguard.toml"
    path.write_text(f'[server]\nlisten = ["127.0.0.1:0"]\n[tenants]\nfile = "tenants.toml"\n'
                    f'[cluster]\nruntime_dir = "{runtime}"\n[delivery]\nspool = "spool"\n')
    return path


def run(path: Path, command: str = "run") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cluster.cli", command, "-c", str(path)],
                          capture_output=True, text=True, timeout=60)


def a_symlink(runtime: Path, elsewhere: Path) -> None:
    elsewhere.mkdir(mode=0o700)
    runtime.symlink_to(elsewhere)


def a_dangling_symlink(runtime: Path, elsewhere: Path) -> None:
    runtime.symlink_to(elsewhere)  # the target does not exist: mkdir would follow it


def open_to_others(runtime: Path, elsewhere: Path) -> None:
    runtime.mkdir(mode=0o700)
    runtime.chmod(0o777)


def a_file(runtime: Path, elsewhere: Path) -> None:
    runtime.write_text("not a folder")


def someone_elses(runtime: Path, elsewhere: Path) -> None:
    runtime.mkdir(mode=0o700)
    os.chown(runtime, 65534, 65534)


CASES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "symlink": (a_symlink, "is a symbolic link, not a folder"),
    "dangling symlink": (a_dangling_symlink, "is a symbolic link, not a folder"),
    "mode 0777": (open_to_others, "is open to group or others (mode 0777); it must be 0700"),
    "file": (a_file, "is not a folder"),
    "another user's": (someone_elses, "belongs to uid 65534, not to this user"),
}


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_hostile_runtime_folder_stops_the_start(short_tmp: Path, case: str,
                                                  command: str) -> None:
    prepare, problem = CASES[case]
    if case == "another user's" and os.geteuid() != 0:
        pytest.skip("needs root to give a folder away")
    runtime, elsewhere = short_tmp / "run", short_tmp / "elsewhere"
    prepare(runtime, elsewhere)
    path = config(short_tmp, runtime)
    result = run(path, command)
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{path}: cluster.runtime_dir: {problem}"), line
    assert line.endswith(f'(got "{runtime}")')
    # Nothing was created through it.
    assert not elsewhere.exists() or list(elsewhere.iterdir()) == []


def test_a_fresh_runtime_folder_is_made_private(short_tmp: Path) -> None:
    runtime = short_tmp / "deep" / "run"
    make_private_dir(runtime)
    info = os.lstat(runtime)
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
    make_private_dir(runtime)  # an existing private folder is fine
    runtime.chmod(0o750)
    with pytest.raises(UnsafeRuntimeDir):
        make_private_dir(runtime)
