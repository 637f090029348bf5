"""Every experiment of the paper, one training function, and the command line.

    python experiments.py tvae_Lhalf_mnist                 # train (Table 1, L = 1/2)
    python experiments.py --list                           # what each experiment reproduces
    python experiments.py tvae_Lhalf_mnist --train-sequences 64 --epochs 2   # a quick look

The registry EXPERIMENTS maps each name of SPEC §3 to its config; the keys are
named as the authors' code names its options. `train` runs any of them.
"""
import argparse
import copy
import difflib
import json
import math
import os
import signal
import sys
import time
import zlib
from pathlib import Path

import torch

import datasets
import tvae

# ─── The registry (SPEC §3) ──────────────────────────────────────────────────
# Shared by all experiments unless overridden: SGD lr 1e-4, momentum 0.9,
# batches of 8 sequences, 100 epochs, evaluation every 5 epochs from epoch 0.
_COMMON = dict(lr=1e-4, momentum=0.9, batch_size=8, max_epochs=100, eval_epochs=5,
               n_is_samples=10, eps=1e-6, mu_init=30, n_off_diag=None, map_shape=None,
               train_sequences=None, test_sequences=None, wandb_on=False)
# MNIST: 18 capsules of 18 units, sequences of 18 frames of RGB 28×28 digits (SPEC §2.1).
_MNIST = dict(_COMMON, data="mnist", train_kind="single", test_kind="single",
              n_caps=18, cap_dim=18, n_transforms=18, max_transform_len=18)
# dSprites: 15 capsules of 15 units, sequences of 15 frames of 64×64 sprites (SPEC §2.2).
_DSPRITES = dict(_COMMON, data="dsprites", train_kind="dsprites", test_kind="dsprites",
                 n_caps=15, cap_dim=15, n_transforms=15, max_transform_len=30, seed=1)


def _shifting(kernel, n_off_diag):
    return dict(grouper="shifting", group_kernel=(kernel, kernel, 1), n_off_diag=n_off_diag)


def _stationary(k_time, k_capsule):
    return dict(grouper="stationary", group_kernel=(k_time, k_capsule, 1))


_VAE = dict(grouper="none", group_kernel=None, mu_init=None)

EXPERIMENTS = {
    "tvae_2d_mnist": dict(_MNIST, train_kind="none", test_kind="none", grouper="map2d",
                          n_caps=1, cap_dim=324, n_transforms=1, map_shape=(18, 18),
                          group_kernel=(5, 5, 1), mu_init=10, batch_size=128, max_epochs=250,
                          seed=1, paper="Figure 3 (2-D topographic map)"),
    "tvae_Lhalf_mnist": dict(_MNIST, **_shifting(18, 1), seed=1, paper="Table 1, L=1/2"),
    "tvae_Lpartial_mnist": dict(_MNIST, **_shifting(13, 1), seed=2, paper="Figure 4 (MNIST)"),
    "tvae_Lshort_mnist": dict(_MNIST, **_shifting(5, 1), seed=2, paper="Table 1, L=5/36"),
    "bubbles_mnist": dict(_MNIST, **_stationary(5, 3), seed=1, paper="Table 1, Bubbles"),
    "tvae_L0_mnist": dict(_MNIST, **_stationary(1, 3), seed=1, paper="Table 1, L=0"),
    "nontvae_mnist": dict(_MNIST, **_VAE, seed=1, paper="Table 1, VAE"),
    "tvae_Lpartial_mnist_generalization": dict(
        _MNIST, **_shifting(13, 1), test_kind="dual", seed=2,
        paper="Figures 1, 6, Section B.4 (train single, test rotation+colour)"),
    "tvae_Lpartial_rotcolor_mnist": dict(_MNIST, **_shifting(13, 1), train_kind="dual",
                                         test_kind="dual", seed=1, paper="Figure 23 (rotation+colour)"),
    "tvae_Lpartial_perspective_mnist": dict(_MNIST, **_shifting(13, 1), train_kind="perspective",
                                            test_kind="perspective", seed=1,
                                            paper="Figure 22 (perspective+colour)"),
    "tvae_Lhalf_dsprites": dict(_DSPRITES, **_shifting(15, 0), paper="Table 2, L=1/2"),
    "tvae_Lpartial_dsprites": dict(_DSPRITES, **_shifting(10, 0), paper="Figure 4 (dSprites), Table 2, L=1/3"),
    "tvae_Lshort_dsprites": dict(_DSPRITES, **_shifting(5, 0), paper="Table 2, L=1/6"),
    "bubbles_dsprites": dict(_DSPRITES, **_stationary(5, 5), paper="Table 2, Bubbles"),
    "tvae_L0_dsprites": dict(_DSPRITES, **_stationary(1, 3), eps=1e-3, paper="Table 2, L=0"),
    "nontvae_dsprites": dict(_DSPRITES, **_VAE, paper="Table 2, VAE"),
}
for _name, _config in EXPERIMENTS.items():
    _config["name"] = _name


def image_shape(config):
    """(C, H, W) of the experiment's images: RGB digits when colour changes (SPEC §2.1)."""
    if config["data"] == "dsprites":
        return (1, 64, 64)
    return (1 if config["train_kind"] == "none" else 3, 28, 28)


def build_model(config):
    """The TVAE of an experiment config: its grouper variant of SPEC §1.4 (None for the VAE)."""
    d = config["n_caps"] * config["cap_dim"]
    if config["grouper"] == "none":
        return tvae.TVAE(image_shape(config), d)
    k_time, k_capsule, _ = config["group_kernel"]
    n_off_diag = config["n_off_diag"] if config["grouper"] == "shifting" else None
    grouper = tvae.Grouper(tvae.topographic_kernel(k_time, k_capsule, n_off_diag),
                           config["n_transforms"], config["n_caps"], config["cap_dim"],
                           config["mu_init"], config["eps"],
                           tuple(config["map_shape"]) if config["map_shape"] else None)
    return tvae.TVAE(image_shape(config), d, grouper)
