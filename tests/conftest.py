"""Session-wide real parts: a moto S3 server, a local Ray node, a fresh S3 prefix per test.

The AWS and Ray environment is set when this file is imported, before any test or fixture runs, so no
code path can reach real AWS (or bind Ray to a routable address) even by accident. Until the S3 server
starts, AWS clients point at a closed local port.
"""

from __future__ import annotations

import os
import re

import pytest

from cellsam_ray.testing.cluster import safe_ray_environment, start_local_ray
from cellsam_ray.testing.s3 import LocalS3, safe_aws_environment

for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
    os.environ.pop(_name, None)
os.environ.update(safe_aws_environment())
os.environ.update(safe_ray_environment())


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server with the bucket ``test-bucket``; AWS_ENDPOINT_URL points at it for the session."""
    with LocalS3("test-bucket") as server:
        os.environ["AWS_ENDPOINT_URL"] = server.endpoint_url
        yield server
    os.environ.update(safe_aws_environment())


@pytest.fixture(scope="session")
def storage_options(s3):
    """fsspec options (key, secret, endpoint_url) for the session's S3 server."""
    return s3.storage_options


@pytest.fixture
def s3_prefix(s3, request):
    """A fresh ``s3://test-bucket/<test name>-<random>`` prefix for this test alone."""
    return s3.unique_url(re.sub(r"[^A-Za-z0-9_.-]", "-", request.node.name)[:60])


@pytest.fixture(scope="session")
def ray_cluster(s3):
    """A local Ray node with 2 CPUs, started only for the tests that ask for it.

    It starts after the S3 server, so its workers inherit an AWS_ENDPOINT_URL that points at it.
    """
    import ray

    start_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture
def plan_with_labels():
    """``plan_with_labels(url, **fields)``: the ground-truth segmenter's plan over a local slide (channel
    DAPI, every tile kept), with its label arrays made empty, as a run's start makes them: what the stage
    modules that run without Ray (``pipeline.stages``, ``pipeline.labels_out``, ``driver.extent``,
    ``driver.streaming``) need."""
    from cellsam_ray.io.ngff import create_labels, open_image
    from cellsam_ray.pipeline.plan import make_plan, survey_slide
    from cellsam_ray.spec import SegmentSpec

    def make(url: str, **fields):
        spec = SegmentSpec(input=url, nuclear=["DAPI"], segmenter="cellsam_ray.testing.oracle:GroundTruthSegmenter",
                           segmenter_options=dict(labels=url), tissue_mask=False, qc_images=False, **fields)
        plan = make_plan(spec, survey_slide(spec))
        chunks = [plan.spec.chunk if a in ("y", "x") else 1 for a in plan.axes if a != "c"]
        create_labels(open_image(url, mode="r+"), plan.spec.label_name, chunks=chunks, run_id=plan.run_id)
        return plan

    return make
