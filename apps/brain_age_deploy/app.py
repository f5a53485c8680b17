"""A MONAI Deploy application that serves brain age with a packaged ``slice_cnn_brainage`` bundle.

    python apps/brain_age_deploy/app.py -i INPUT -m BUNDLE -o OUTPUT

- INPUT: a folder of NIfTI volumes on the bundle's grid (what ``python -m data_prep preprocess`` writes),
  with an optional ``ages.csv`` (columns ``subject,age``; subject = file name without ``.nii(.gz)``; every
  volume listed) for the brain-age gap.
- BUNDLE (the SDK's model path): the unzipped Model Zoo bundle (``python -m workflows package-bundles``); the
  app runs that bundle's own ``configs/inference.json`` (its preprocessing, input check, network and
  ``postprocessing``), so it needs nothing of this repository.
- OUTPUT: ``brain_age.json``, one entry per subject: ``predicted_age`` and, where the age is known,
  ``brain_age_gap`` and ``corrected_gap`` (years; null where it is not). The bundle's own report
  (``inference_predictions.csv``, input check) goes to ``OUTPUT/bundle_eval``.

Two operators: ``BrainAgeOperator`` (runs once, emits the per-subject dict) and ``JsonWriterOperator``.
Needs ``pip install -e ".[deploy]"`` (the SDK, holoscan, pydicom, highdicom); runs on CPU or GPU.
"""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

from ignite.engine import Events
from monai.bundle import ConfigWorkflow
from monai.deploy.conditions import CountCondition
from monai.deploy.core import Application, Operator, OperatorSpec

AGES_FILE = "ages.csv"
OUTPUT_FILE = "brain_age.json"
OUTPUT_KEYS = {"predicted_age": "pred", "brain_age_gap": "brain_age_gap", "corrected_gap": "corrected_gap"}


def read_ages(folder: Path) -> dict[str, float]:
    """Subject -> age from ``folder/ages.csv``; empty when there is no such file."""
    if not (folder / AGES_FILE).is_file():
        return {}
    with open(folder / AGES_FILE, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if rows and not {"subject", "age"} <= set(rows[0]):
        raise ValueError(f"{folder / AGES_FILE}: needs the columns subject and age, has {sorted(rows[0])}")
    return {row["subject"]: float(row["age"]) for row in rows}


def predict(bundle: Path, folder: Path, work_dir: Path) -> dict[str, dict]:
    """Run the bundle's ``configs/inference.json`` on the volumes of ``folder`` (listed by the bundle itself,
    its ``input_dir``), with their ages when ``ages.csv`` lists them (then it must list every volume);
    return its postprocessed outputs by subject."""
    if not (bundle / "configs" / "inference.json").is_file():
        raise FileNotFoundError(f"model path {bundle} is not an unzipped bundle (no configs/inference.json)")
    if str(bundle) not in sys.path:
        sys.path.insert(0, str(bundle))  # the bundle's vendored scripts/ package
    workflow = ConfigWorkflow(config_file=str(bundle / "configs" / "inference.json"),
                              meta_file=str(bundle / "configs" / "metadata.json"), workflow_type="inference",
                              bundle_root=str(bundle), input_dir=str(folder), output_dir=str(work_dir))
    ages = read_ages(folder)
    if ages:
        records = workflow.parser.get_parsed_content("datalist")
        if missing := [r["subject"] for r in records if r["subject"] not in ages]:
            raise ValueError(f"{folder / AGES_FILE} lists no age for {', '.join(missing)}: list every volume, or none")
        workflow.parser["datalist"] = [{**r, "age": ages[r["subject"]]} for r in records]
    workflow.initialize()
    results: dict[str, dict] = {}

    def collect(engine) -> None:
        for record, output in zip(engine.state.batch, engine.state.output):
            results[record["subject"]] = {name: _number(output[key]) for name, key in OUTPUT_KEYS.items()}

    workflow.parser.get_parsed_content("evaluator").add_event_handler(Events.ITERATION_COMPLETED, collect)
    workflow.run()
    workflow.finalize()
    return results


def _number(value) -> float | None:
    """A one-element tensor as a float, None for NaN (JSON has no NaN)."""
    number = float(value.reshape(-1)[0])
    return None if math.isnan(number) else number


class BrainAgeOperator(Operator):
    """Predicts brain age for every volume of ``input_path`` with the bundle at ``bundle_path``; emits
    ``{subject: {predicted_age, brain_age_gap, corrected_gap}}`` on ``brain_age``."""

    def __init__(self, fragment, *args, input_path: Path, bundle_path: Path, work_dir: Path, **kwargs) -> None:
        self.input_path, self.bundle_path, self.work_dir = Path(input_path), Path(bundle_path), Path(work_dir)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.output("brain_age")

    def compute(self, op_input, op_output, context) -> None:
        op_output.emit(predict(self.bundle_path, self.input_path, self.work_dir), "brain_age")


class JsonWriterOperator(Operator):
    """Writes what arrives on ``brain_age`` to ``output_path/brain_age.json``."""

    def __init__(self, fragment, *args, output_path: Path, **kwargs) -> None:
        self.output_path = Path(output_path)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec) -> None:
        spec.input("brain_age")

    def compute(self, op_input, op_output, context) -> None:
        self.output_path.mkdir(parents=True, exist_ok=True)
        text = json.dumps(op_input.receive("brain_age"), indent=1) + "\n"
        (self.output_path / OUTPUT_FILE).write_text(text)


class BrainAgeApp(Application):
    """Input folder -> brain age per subject (JSON), with the SDK's ``-i``, ``-m``, ``-o`` (or the
    HOLOSCAN_INPUT_PATH, HOLOSCAN_MODEL_PATH, HOLOSCAN_OUTPUT_PATH variables)."""

    def compose(self) -> None:
        context = Application.init_app_context(self.argv)
        output = Path(context.output_path)
        predictor = BrainAgeOperator(self, CountCondition(self, 1), input_path=Path(context.input_path),
                                     bundle_path=Path(context.model_path), work_dir=output / "bundle_eval",
                                     name="brain_age")
        writer = JsonWriterOperator(self, output_path=output, name="json_writer")
        self.add_flow(predictor, writer, {("brain_age", "brain_age")})


if __name__ == "__main__":
    BrainAgeApp().run()
