from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clusterproc import Cluster


@pytest.fixture
def make_cluster(dns: Any) -> Iterator[Callable[..., Cluster]]:
    """Clusters in short /tmp folders (ipc paths), stopped and removed afterwards."""
    made: list[tuple[Cluster, Path]] = []

    def make(**kwargs: Any) -> Cluster:
        folder = Path(tempfile.mkdtemp(dir="/tmp", prefix="sgc"))
        cluster = Cluster(folder, dns, **kwargs)
        made.append((cluster, folder))
        return cluster

    yield make
    for cluster, folder in made:
        try:
            cluster.stop()
        finally:
            if not os.environ.get("SENDGUARD_KEEP_TEST_FILES"):
                shutil.rmtree(folder, ignore_errors=True)
