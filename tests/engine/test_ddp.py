"""DDP: two CPU processes (gloo, launched by torchrun) train like one process that sees
the same global batch; distributed evaluation gathers every rank's detections.

Exactness needs the losses not to depend on which process draws which random numbers, so
the test samples every anchor and every RoI (sampler batch sizes above the counts), uses
one training size and no flips; GroupNorm keeps BatchNorm statistics out of it. Every
iteration uses both images of the two-image set (one per rank), so the data order does
not matter either. DDP averages the two ranks' gradients: the single-process reference
minimises the mean of the two per-image losses.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.train import seed_everything
from maskrcnn import build_model

PACKAGE_DIR = Path(__file__).resolve().parents[2]   # the repository root

WORKER = """
import sys, json, torch
torch.set_num_threads(1)
from maskrcnn import load_config, apply_overrides, DEFAULT_CONFIG
from engine import distributed as dist_utils
from engine.train import train
cfg = apply_overrides(load_config(DEFAULT_CONFIG), json.loads(sys.argv[1]))
summary = train(cfg, progress=False)
rank = dist_utils.get_rank()
torch.save(summary["model"].state_dict(), f"{sys.argv[2]}/rank{rank}.pt")
# distributed evaluation: each rank runs its shard, rank 0 gathers and scores
from engine.data import CocoInstances
from engine.evaluate import evaluate

val = CocoInstances(cfg.data.train_json, cfg.data.train_images, train=False)
metrics = evaluate(summary["model"], val, progress=False,
                   results_path=f"{sys.argv[2]}/results.json" if rank == 0 else None)
json.dump(metrics, open(f"{sys.argv[2]}/metrics{rank}.json", "w"))
dist_utils.cleanup()
"""


@pytest.fixture
def two_images(tmp_path):
    from engine.shapes import make_shapes
    return make_shapes(tmp_path / "data", "train", 2, 64, 3, seed=5, min_instances=2)


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(two_images, tiny_cfg, tmp_path):
    from engine.data import CocoInstances
    json_path, image_dir = two_images
    iters, lr = 3, 0.01
    cfg = tiny_cfg(train_json=str(json_path), train_images=str(image_dir), batch_size=2,
                   max_iter=iters, lr=lr, momentum=0.9, weight_decay=0.0, warmup_iters=0,
                   flip_prob=0.0, rpn_batch_size_per_image=4096,
                   box_batch_size_per_image=4096, output_dir=str(tmp_path / "ddp"),
                   checkpoint_every=iters, log_every=1, seed=3, box_score_thresh=0.0)
    overrides = {f"{s}.{k}": list(v) if isinstance(v, tuple) else v
                 for s, keys in cfg.items() for k, v in keys.items()}
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(PACKAGE_DIR) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("WORLD_SIZE", None)
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", str(script), json.dumps(overrides), str(tmp_path)],
        cwd=PACKAGE_DIR, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)

    # the reference: one process, the same global batch (both images) each iteration
    seed_everything(cfg.solver.seed)                 # rank 0's initialisation
    model = build_model(cfg).train()
    # the weights every process starts from, copied before any step changes them
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr,
                          momentum=0.9)
    dataset = CocoInstances(json_path, image_dir, train=True)
    batch = [dataset[i] for i in range(len(dataset))]
    for _ in range(iters):
        per_image = [sum(model([image], [target]).values()) for image, target in batch]
        loss = sum(per_image) / len(per_image)
        opt.zero_grad()
        loss.backward()
        opt.step()
    reference = model.state_dict()

    moved = 0
    for key in reference:
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], reference[key], atol=1e-5, rtol=0, msg=key)
        moved += not torch.equal(rank0[key], initial[key])
    assert moved > 10                                  # training did change the weights
    # distributed evaluation equals single-process evaluation of the same weights
    from engine.evaluate import evaluate
    model.load_state_dict(rank0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                           # as the workers: same float sums
    try:
        metrics = evaluate(model, CocoInstances(json_path, image_dir), progress=False,
                           results_path=str(tmp_path / "single.json"))
    finally:
        torch.set_num_threads(threads)
    gathered = json.loads((tmp_path / "results.json").read_text())
    single = json.loads((tmp_path / "single.json").read_text())
    assert {r["image_id"] for r in gathered} == {1, 2}           # both ranks' images
    key = lambda r: (r["image_id"], -r["score"], r["bbox"])      # noqa: E731
    assert sorted(gathered, key=key) == sorted(single, key=key)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"metrics{rank}.json").read_text()) == metrics
    # only rank 0 writes: one log line per iteration, one checkpoint
    log = (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["iter"] for line in log] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "ddp").glob("model_*.pth")) == \
        ["model_0000003.pth"]
