"""Does a TGB-GAN keep age? A real-trained 3D regressor (the judge, a ``model.pt`` of the slice bundle's
``train.json`` layered with the tgb bundle's ``downstream_regressor3d.json``) scores:

- the real test volumes x, and x smoothed with a Gaussian of sigma 0.5 / 0.75 / 1 voxel or with noise
  added: whether the judge reads sharpness as age (a judge that does cannot check a generator that smooths);
- the generator's reconstructions G(x) of the same volumes (``inference.json`` with the GAN's bundle root
  writes them to ``eval/reconstructions``): age retention, MAE on G(x) / MAE on x;
- the synthetic volumes of ``generate.json`` (``eval/synthetic/datalist.json``) against their assigned ages:
  realism, MAE on them / MAE on x;
- where a shift sits: hybrids that take G(x)'s coarse content (Gaussian sigma 1 voxel) and x's fine detail,
  and the reverse; and the power of G(x) - x at the period-2 (checkerboard) frequencies relative to x's.

    python benchmarks/tgb_age_probes.py --judge RUN/models/model.pt --datalist real100.json --gan_root GAN_RUN
"""
from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from brainage_core.datalist import read_datalist, synthetic_records
from custom_components.common.brain_age import brain_age_metrics
from custom_components.common.networks.age_cnn3d import AgeCNN3d
from custom_components.tgb_gan.augmentation_study import reconstruction_records

BLUR_SIGMAS = (0.5, 0.75, 1.0)  # voxels
NOISE_SD = 0.03  # of the [0, 1]-scaled volume: about the size of an autoencoder's residual here


def unit_range(volume: np.ndarray) -> np.ndarray:
    return (volume - volume.min()) / (volume.max() - volume.min())


def judge(path: str, channels: list[int]) -> AgeCNN3d:
    network = AgeCNN3d(channels=channels)
    network.load_state_dict(torch.load(path, weights_only=True))
    return network.eval()


def scores(network: AgeCNN3d, volumes: list[np.ndarray], ages: np.ndarray) -> dict[str, float]:
    with torch.no_grad():
        predicted = torch.cat([network(torch.tensor(np.stack(volumes[i:i + 8]), dtype=torch.float32)[:, None])
                               for i in range(0, len(volumes), 8)]).squeeze(1).numpy()
    return brain_age_metrics(predicted, ages)


def period_two_power(volume: np.ndarray) -> float:
    """Power of a volume's period-2 components along any axis (the Nyquist planes of its spectrum)."""
    power = np.abs(np.fft.fftn(volume)) ** 2
    return float(sum(np.take(power, n // 2, axis=axis).sum() for axis, n in enumerate(volume.shape)))


def line(name: str, metrics: dict, reference: dict | None = None) -> str:
    ratio = f"  ({metrics['mae'] / reference['mae']:.2f}x x)" if reference else ""
    return (f"{name:34s} n {metrics['n']:3d}  MAE {metrics['mae']:6.2f}  mean gap {metrics['mean_gap']:+6.2f}  "
            f"r {metrics['pearson_r']:.3f}{ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--judge", required=True, help="model.pt of a real-trained AgeCNN3d")
    parser.add_argument("--channels", default="16,32,64,128", help="the judge's AgeCNN3d channels")
    parser.add_argument("--datalist", required=True, help="datalist whose test split is scored")
    parser.add_argument("--gan_root", help="bundle root of a TGB-GAN run with eval/reconstructions and eval/synthetic")
    args = parser.parse_args()
    network = judge(args.judge, [int(c) for c in args.channels.split(",")])
    test = read_datalist(args.datalist)["test"]
    ages = np.array([float(r["age"]) for r in test])
    real = [unit_range(nib.load(r["image"]).get_fdata()) for r in test]
    reference = scores(network, real, ages)
    print(line("x (real test volumes)", reference))
    for sigma in BLUR_SIGMAS:
        print(line(f"x smoothed, sigma {sigma} voxel", scores(network, [gaussian_filter(v, sigma) for v in real], ages), reference))
    rng = np.random.default_rng(0)
    noisy = [v + rng.normal(0.0, NOISE_SD, v.shape) for v in real]
    print(line(f"x + noise, sd {NOISE_SD}", scores(network, noisy, ages), reference))
    if args.gan_root is None:
        return
    root = Path(args.gan_root) / "eval"
    reconstructed = [unit_range(nib.load(r["image"]).get_fdata()) for r in reconstruction_records(args.gan_root, test)]
    print(line("G(x): retention", scores(network, reconstructed, ages), reference))
    print(line("coarse G(x) + fine x", scores(network, [gaussian_filter(g, 1.0) + v - gaussian_filter(v, 1.0)
                                                       for v, g in zip(real, reconstructed)], ages), reference))
    print(line("coarse x + fine G(x)", scores(network, [gaussian_filter(v, 1.0) + g - gaussian_filter(g, 1.0)
                                                       for v, g in zip(real, reconstructed)], ages), reference))
    ratio = sum(period_two_power(g - v) for v, g in zip(real, reconstructed)) / sum(map(period_two_power, real))
    print(f"period-2 power of G(x) - x / of x: {ratio:.2f}")
    synthetic = synthetic_records(root / "synthetic" / "datalist.json")
    volumes = [unit_range(nib.load(r["image"]).get_fdata()) for r in synthetic]
    print(line("synthetic vs assigned ages: realism", scores(network, volumes, np.array([r["age"] for r in synthetic])),
               reference))


if __name__ == "__main__":
    main()
