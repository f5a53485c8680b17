"""The augmentation study's set-up: the small real training set it draws, and which downstream models it trains."""
import pytest

from brainage_core.datalist import read_datalist, write_datalist
from custom_components.tgb_gan.augmentation_study import AugmentationStudy, epochs_for_steps, write_training_subset


@pytest.fixture
def datalist(tmp_path):
    records = {split: [{"image": f"{split}{i}.nii.gz", "age": 20.0 + i} for i in range(n)]
               for split, n in (("training", 30), ("validation", 4), ("test", 5))}
    return write_datalist(tmp_path / "datalist.json", records)


def test_training_subset_is_a_seeded_draw_of_the_training_split_with_the_other_splits_whole(datalist, tmp_path):
    full = read_datalist(datalist)
    first = read_datalist(write_training_subset(datalist, 10, 0, tmp_path / "a.json"))
    again = read_datalist(write_training_subset(datalist, 10, 0, tmp_path / "b.json"))
    other = read_datalist(write_training_subset(datalist, 10, 1, tmp_path / "c.json"))
    assert first == again and first["training"] != other["training"]
    assert len(first["training"]) == 10 and all(r in full["training"] for r in first["training"])
    assert first["training"] == sorted(first["training"], key=full["training"].index)  # kept in the source order
    assert first["validation"] == full["validation"] and first["test"] == full["test"]
    with pytest.raises(ValueError, match=r"n_train_real must be in \[2, 30\].*datalist.json"):
        write_training_subset(datalist, 31, 0, tmp_path / "d.json")


def study(datalist, tmp_path, **kwargs) -> AugmentationStudy:
    models = {"regressor3d": {"config_files": ["downstream_regressor3d.json"]},
              "slice_cnn": {"overrides": {"network_def": {"dropout": 0.1}}}}
    return AugmentationStudy(dataset_dir=str(tmp_path), datalist_file=str(datalist), output_dir=str(tmp_path / "out"),
                             gan_config_dir=str(tmp_path), downstream_config_dir=str(tmp_path),
                             gan_variants={"tgb_gan": 1.0}, gan_overrides={}, generator_overrides={},
                             synthesis_overrides={}, downstream_models=models,
                             downstream_overrides={"optimizer": {"lr": 0.01}}, **{"downstream_iterations": 20, **kwargs})


def test_study_trains_the_chosen_downstream_models_and_refuses_unknown_ones(datalist, tmp_path):
    assert list(study(datalist, tmp_path).downstream_models) == ["regressor3d", "slice_cnn"]
    chosen = study(datalist, tmp_path, models=["slice_cnn"], check_model="slice_cnn")
    assert chosen.downstream_models == {"slice_cnn": {"network_def#dropout": 0.1, "optimizer#lr": 0.01}}
    assert list(chosen.downstream_files) == ["slice_cnn"]
    with pytest.raises(ValueError, match="check_model 'regressor3d'"):
        study(datalist, tmp_path, models=["slice_cnn"])
    for bad in (["slice"], []):
        with pytest.raises(ValueError, match="models must name some of the downstream models"):
            study(datalist, tmp_path, models=bad)
    with pytest.raises(ValueError, match="jobs must be at least 1, got 0"):
        study(datalist, tmp_path, jobs=0)


def test_every_downstream_training_makes_the_same_number_of_optimizer_steps(datalist, tmp_path):
    """Real-only and real + synthetic runs get the same updates: epochs follow the training-set size."""
    augmented = read_datalist(datalist)
    augmented["training"] += [{"image": f"syn{i}.nii.gz", "age": 30.0, "synthetic": True} for i in range(20)]
    augmented = write_datalist(tmp_path / "augmented.json", augmented)
    chosen = study(datalist, tmp_path, downstream_batch_size=8)
    for path, epochs in ((datalist, 5), (augmented, 3)):  # 30 subjects: 4 steps an epoch; 50: 7
        train, test = chosen.downstream_steps("slice_cnn", "real", path, seed=0)
        assert train[3]["train#trainer#max_epochs"] == epochs and train[3]["batch_size"] == 8
        assert train[3]["optimizer#lr"] == 0.01 and test[3] == train[3]
    assert epochs_for_steps(800, 50, 8) == 115 and epochs_for_steps(520, 100, 8) == 40  # the GANs', the default
    with pytest.raises(ValueError, match="downstream_iterations and downstream_batch_size must be at least 1, got 0"):
        study(datalist, tmp_path, downstream_iterations=0)
