"""Settings for the whole suite."""
import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread_per_xdist_worker():
    """`make test` runs pytest -n 2 (pytest-xdist): two worker processes on the 2 cores.
    Each gets one torch thread, so that the two do not oversubscribe the cores (OpenMP
    threads spin while their partner is descheduled). A test that needs more threads sets
    them itself."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(checkpoint path, held-out shapes images): the demo recipe (ResNet-18, 128 px
    synthetic shapes) trained here for a fixed 150 iterations (~30 s on 2 cores): enough
    to tell objects from the background, so a blank image has no detections.

    Trained once per test session: xdist workers share it through a lock in their common
    temporary folder (training is seeded, so whichever worker trains, it is the same)."""
    import fcntl
    from engine.data import CocoInstances
    base = tmp_path_factory.getbasetemp()
    # xdist workers' folders are <session>/popen-gwN: share the session's folder
    session = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    root = session / "trained_demo150"
    root.mkdir(exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        checkpoint = root / "checkpoint.txt"
        if not checkpoint.exists():
            checkpoint.write_text(str(_train_demo_recipe(root)))
        path = checkpoint.read_text()
    dataset = CocoInstances(str(root / "val.json"), str(root / "val"), train=False)
    return path, [dataset[i][0] for i in range(len(dataset))]


def _train_demo_recipe(root):
    from engine.shapes import make_shapes
    from engine.train import train
    from maskrcnn import MaskRCNN
    train_json, train_images = make_shapes(root, "train", 150, 128, 3, seed=0)
    val_json, val_images = make_shapes(root, "val", 8, 128, 3, seed=1000)
    assert (val_json, val_images) == (root / "val.json", root / "val"), (val_json, val_images)
    # The resolved config of the demo recipe (MaskRCNN validates the overrides).
    cfg = MaskRCNN(config="configs/demo.ini", num_classes=3, train_json=str(train_json),
                   train_images=str(train_images), val_json="none",
                   output_dir=str(root / "out"), max_iter=150, warmup_iters=20,
                   checkpoint_every=0, log_every=50).cfg
    return train(cfg, progress=False)["checkpoint"]
