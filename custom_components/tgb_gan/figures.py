"""Figures of the TGB-GAN bundle: real vs reconstructed slices (a validation handler) and map overlays."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine
from monai.handlers import from_engine

from custom_components.common.handlers import EpochCollector, PlotInterval
from custom_components.common.plots import VIEWS, central_slices, plt, save_figure


def reconstruction_figure(real, reconstruction, title: str = "real vs reconstructed"):
    """One row per volume: its three central slices, real then reconstructed, on a shared grey scale."""
    real, reconstruction = np.asarray(real), np.asarray(reconstruction)
    n = len(real)
    fig, axes = plt.subplots(n, 6, figsize=(12, 2.1 * n), squeeze=False)
    for row, (a, b) in enumerate(zip(real, reconstruction)):
        vmax = float(max(a.max(), b.max())) or 1.0
        for col, (image, kind, view) in enumerate(
                [(s, "real", v) for s, v in zip(central_slices(a), VIEWS)]
                + [(s, "recon", v) for s, v in zip(central_slices(b), VIEWS)]):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray", vmin=0.0, vmax=vmax)
            ax.set_axis_off()
            if row == 0:
                ax.set_title(f"{kind} {view}", fontsize=8)
    fig.suptitle(title)
    return fig


class ReconstructionGrid(EpochCollector):
    """Each evaluation epoch: a PNG (and a TensorBoard figure) of the first ``n_images`` real volumes next
    to their reconstructions, as ``<output_dir>/<prefix>epoch_XXXX.png``.

    ``output_transform`` maps the (decollated) engine output to ``(images, reconstructions)``, lists of
    (1, D, H, W) tensors. ``log_dir``: where TensorBoard figures go (None: PNG only). ``plot_interval``:
    draw on every this many validations only (a figure costs most of a second, much of a GPU epoch).
    """

    def __init__(self, output_dir, n_images: int = 4, log_dir=None, prefix: str = "reconstructions_",
                 output_transform=from_engine(["image", "pred"]), tag: str = "reconstructions",
                 plot_interval: int = 1) -> None:
        if n_images < 1:
            raise ValueError(f"n_images must be >= 1, got {n_images}")
        self.output_dir = Path(output_dir)
        self.n_images, self.log_dir, self.prefix, self.tag = n_images, log_dir, prefix, tag
        self.output_transform = output_transform
        self.plot_every = PlotInterval(plot_interval)
        self._writer = None
        self._real: list[np.ndarray] = []
        self._recon: list[np.ndarray] = []

    def _reset(self, engine: Engine) -> None:
        self._real, self._recon = [], []

    def _collect(self, engine: Engine) -> None:
        if len(self._real) >= self.n_images:
            return
        images, reconstructions = self.output_transform(engine.state.output)
        for image, recon in zip(images, reconstructions):
            if len(self._real) < self.n_images:
                self._real.append(_first_channel(image))
                self._recon.append(_first_channel(recon))

    def _report(self, engine: Engine) -> None:
        if not self._real or not self.plot_every.due():
            return
        epoch = engine.state.epoch
        fig = reconstruction_figure(self._real, self._recon, title=f"epoch {epoch}: real vs reconstructed")
        if self.log_dir is not None:
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(log_dir=str(self.log_dir))
            self._writer.add_figure(self.tag, fig, global_step=epoch, close=False)
            self._writer.flush()
        save_figure(fig, self.output_dir / f"{self.prefix}epoch_{epoch:04d}.png")


def _first_channel(volume) -> np.ndarray:
    return torch.as_tensor(volume).detach().float().cpu().numpy()[0]
