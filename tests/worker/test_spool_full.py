"""SPEC §2: a spool that cannot be written gives 451 4.3.0, and the refusal counts nothing."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway import MESSAGE, running_gateway


@pytest.fixture
def tiny_disk(short_tmp: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: running as root, permissions cannot fake a full disk."""
    folder = short_tmp / "spool"
    folder.mkdir()
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("mounting a tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_full_spool_gives_451_and_changes_no_counter(short_tmp: Path, tiny_disk: Path,
                                                     dns) -> None:
    big = MESSAGE + (b"z" * 76 + b"\r\n") * 1400  # ~110 KB: two fit, the third does not
    with running_gateway(short_tmp / "gw", dns, delivery={"spool": str(tiny_disk)},
                         limits=[{"window": "1h", "max": 3}]) as gateway:
        client = gateway.login("127.0.0.61")
        replies = [gateway.send(client, body=big) for _ in range(3)]
        assert [code for code, _ in replies[:1]] == [250]
        failed = [(code, text) for code, text in replies if code != 250]
        assert failed, replies
        code, text = failed[0]
        sid = text.split()[1]
        assert (code, text) == (451, f"4.3.0 {sid} temporary failure, try later")
        accepted = sum(code == 250 for code, _ in replies)
        # The refused messages took nothing from the limit of 3: small ones still fit.
        for _ in range(3 - accepted):
            assert gateway.send(client)[0] == 250
        code, text = client.mail("jan@kowalski.pl")
        assert (code, text.decode()) == (550, f"5.1.0 {sid} policy violation")
        client.quit()
