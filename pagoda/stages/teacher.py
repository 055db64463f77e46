"""Stage 1: the EDM diffusion teacher at the base resolution (METHOD §1, §2 "Stage 1").

D(x; sigma, y) = EDMPrecond(UNet) trained with the EDM loss; labels are replaced by the null
class with probability diffusion.label_dropout so that the teacher supports CFG.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from pagoda import dist
from pagoda.config import TeacherConfig, to_dict
from pagoda.data import build_dataset, to_model
from pagoda.diffusion import EDMPrecond, edm_loss
from pagoda.errors import UserError
from pagoda.networks.unet import UNet
from pagoda.train import Stage, train


class TeacherStage(Stage):
    """The UNet F and one training step of the EDM loss (the loop in pagoda.train does the rest)."""

    name = "teacher"
    kind = "teacher"

    def __init__(self, cfg: TeacherConfig):
        self.cfg = cfg
        self.net = UNet(**dataclasses.asdict(cfg.network))

    def step(self, net: nn.Module, batch: list[torch.Tensor], generator: torch.Generator, phase=None):
        """Mean EDM loss of a micro-batch (x uint8 [N,3,R,R], y int64 [N]); no extra statistics."""
        x, y = batch
        d, num_classes = self.cfg.diffusion, self.cfg.network.num_classes
        D = EDMPrecond(net, sigma_data=d.sigma_data)
        labels = y if num_classes > 0 else None
        loss = edm_loss(D, to_model(x), labels, P_mean=d.P_mean, P_std=d.P_std, sigma_data=d.sigma_data,
                        label_dropout=d.label_dropout if labels is not None else 0.0, num_classes=num_classes,
                        generator=generator)
        return loss.mean(), {}


def check_classes(cfg: TeacherConfig, num_classes: int) -> None:
    """The network's class count must be the data's (0 for unlabeled data)."""
    if cfg.network.num_classes != num_classes:
        raise UserError(f"network.num_classes={cfg.network.num_classes} but data source {cfg.data.source!r} has "
                        f"{num_classes} classes: add --set network.num_classes={num_classes}")


def run(cfg: TeacherConfig, *, out_dir: str | os.PathLike) -> Path:
    """Train (or resume, or find finished) the teacher in out_dir; returns the path of teacher.safetensors."""
    with dist.session():
        dataset = build_dataset(cfg.data.source, cfg.data.resolution, xflip=cfg.data.xflip)
        check_classes(cfg, dataset.num_classes)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and every rerun
        stage = TeacherStage(cfg)
        # the data's content (pagoda.data fingerprints), not its path: other images at the same path are another run
        inputs = {"data_fingerprint": dataset.fingerprint()}
        return train(stage=stage, cfg=cfg.train, out_dir=out_dir, config_dict={**to_dict(cfg), "inputs": inputs},
                     dataset=dataset,
                     num_workers=cfg.data.num_workers)
