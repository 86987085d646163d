"""Fixtures for the job-server tests (helpers in server_helpers.py)."""

import pytest
from server_helpers import Server, wait_status


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_model_dir):
    """A server shared by the API and dashboard tests (small upload limit to test it)."""
    srv = Server(tmp_path_factory.mktemp("server") / "data", tiny_model_dir, "--max-file-mb", "0.05").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def uploaded(server, tiny_data):
    """The tiny training and validation files, uploaded once."""
    train_f, valid_f = tiny_data
    c = server.client
    return (c.files.create(file=open(train_f, "rb"), purpose="fine-tune"),
            c.files.create(file=open(valid_f, "rb"), purpose="fine-tune"))


@pytest.fixture(scope="session")
def finished_job(server, uploaded):
    """One job run to the end: 2 epochs of 32 examples in batches of 8 = 8 steps, evaluated every 4."""
    train_file, valid_file = uploaded
    job = server.client.fine_tuning.jobs.create(
        model="tiny", training_file=train_file.id, validation_file=valid_file.id, suffix="rev", seed=7,
        hyperparameters={"n_epochs": 2, "batch_size": 8, "learning_rate_multiplier": 2},
        extra_body={"tunesmith_config": {"eval.every_steps": 4, "checkpoint.every_steps": 4}})
    return wait_status(server.client, job.id, "succeeded", "failed", "cancelled")
