from __future__ import annotations

import pytest

from tests.examples.slurm_cluster import Slurm, start_cluster, stop_cluster


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> Slurm:
    cluster, procs = start_cluster(tmp_path_factory.mktemp("slurm"), cpus=2)
    try:
        yield cluster
    finally:
        stop_cluster(procs)
