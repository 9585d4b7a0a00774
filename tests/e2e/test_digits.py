"""A small real task end to end: a conv net learns scikit-learn's 8x8 digits in a training job.

The job is checked twice over: the service's forward on held-out digits must classify at
least 95% of them, and the same loop written in plain torch (the session's initial
parameters, the job's mini-batches in its order, torch's Adam) must end with the very
parameters the job committed. Everything is float64 and one process computes in a fixed
order, so the comparison is exact, not merely within a tolerance.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from tests.e2e.server import Server

pytestmark = pytest.mark.slow

EPOCHS, BATCH_SIZE, SEED, LR = 10, 64, 7, 1e-2
CHANNELS = 16
MODEL: dict[str, Any] = {
    "type": "sequential",
    "dtype": "float64",
    "seed": 0,
    "layers": [
        {
            "type": "conv2d",
            "in_channels": 1,
            "out_channels": CHANNELS,
            "kernel_size": 3,
            "padding": 1,
        },
        {"type": "relu"},
        {"type": "max_pool2d", "kernel_size": 2},
        {"type": "flatten"},
        {"type": "linear", "in_features": CHANNELS * 4 * 4, "out_features": 10},
    ],
}


def torch_model() -> nn.Sequential:
    """MODEL as torch.nn builds it (its parameter names are the session's)."""
    return nn.Sequential(
        nn.Conv2d(1, CHANNELS, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(CHANNELS * 4 * 4, 10),
    ).double()


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 1797 bundled digits as [N, 1, 8, 8] in [0, 1], and their classes: 80% to train on,
    20% held out, split once and for all (a fixed random_state, stratified by class)."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float64).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    train, test = train_test_split(
        torch.arange(len(y)), test_size=0.2, random_state=0, stratify=data.target
    )
    return x[train], y[train], x[test], y[test]


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    db = tmp_path_factory.mktemp("digits") / "digits.db"
    with Server("--store", f"sqlite:///{db}") as server:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            yield client


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The plain torch loop's tensors are tiny: one intra-op thread is several times faster
    than two fighting over the cores with the server's worker."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def as_tensors(params: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(value, dtype=torch.float64) for name, value in params.items()}


@pytest.mark.usefixtures("one_thread")
def test_a_conv_net_job_learns_the_digits_as_plain_torch_does(http: httpx.Client) -> None:
    x_train, y_train, x_test, y_test = digits()
    created = http.post(
        "/v1/sessions",
        json={
            "model": MODEL,
            "loss": "cross_entropy",
            "optimizer": {"type": "adam", "lr": LR},
            "name": "digits",
        },
    )
    assert created.status_code == 201, created.text
    sid = created.json()["id"]
    initial = as_tensors(created.json()["params"])

    body = {
        "dataset": {"x": x_train.tolist(), "y": y_train.tolist()},
        "epochs": EPOCHS,
        "batch_size": BATCH_SIZE,
        "shuffle": True,
        "seed": SEED,
    }
    started = http.post(f"/v1/sessions/{sid}/train", json=body)
    assert started.status_code == 202, started.text
    job_id = started.json()["id"]
    deadline = time.monotonic() + 120
    while (job := http.get(f"/v1/jobs/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    steps = EPOCHS * -(-len(y_train) // BATCH_SIZE)
    assert (job["status"], job["steps_done"], job["epoch"]) == ("succeeded", steps, EPOCHS), job

    # The service's own forward on the held-out fifth.
    forward = http.post(
        f"/v1/sessions/{sid}/forward",
        json={"batch": {"x": x_test.tolist()}, "encoding": "list"},
    )
    assert forward.status_code == 200, forward.text
    predicted = torch.tensor(forward.json()["outputs"]).argmax(dim=1)
    accuracy = (predicted == y_test).double().mean().item()
    assert accuracy >= 0.95, accuracy

    # The same loop in plain torch: the job's order is randperm(seed + epoch) each epoch.
    model = torch_model()
    model.load_state_dict(initial)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    for epoch in range(EPOCHS):
        order = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(SEED + epoch))
        for rows in order.split(BATCH_SIZE):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x_train[rows]), y_train[rows]).backward()
            optimizer.step()
    session = http.get(f"/v1/sessions/{sid}").json()
    assert session["step"] == steps
    served = as_tensors(session["params"])
    expected = {name: p.detach() for name, p in model.named_parameters()}
    assert served.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(served[name], value), (name, (served[name] - value).abs().max())
