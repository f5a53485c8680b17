"""The GAN's training figures: reconstruction grids on the plot interval."""
import torch
from ignite.engine import Engine

from custom_components.tgb_gan import figures


def test_reconstruction_grids_follow_the_plot_interval(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(figures, "reconstruction_figure", lambda *args, **kwargs: drawn.append(1))
    monkeypatch.setattr(figures, "save_figure", lambda *args, **kwargs: None)
    volume = torch.zeros(1, 4, 4, 4)
    evaluator = Engine(lambda engine, batch: [{"image": volume, "pred": volume}])
    figures.ReconstructionGrid(tmp_path, n_images=1, plot_interval=2).attach(evaluator)
    for _ in range(5):
        evaluator.run([0])
    assert len(drawn) == 2
