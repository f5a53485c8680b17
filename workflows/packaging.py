"""Packaging for sharing: each bundle as a self-contained zip in the MONAI Model Zoo layout.

``python -m workflows package-bundles`` (``make bundles``) writes ``dist/<name>_v<version>.zip`` holding
``<name>/`` with the bundle's configs, docs, LICENSE, large_files.yml, the large files it lists that
exist (the trained ``models/model.pt``; packaging refuses when one a config loads is missing), and
``scripts/``: exactly the modules of the runtime core (``brainage_core``) and ``custom_components`` the configs
need, found by following imports transitively from the modules the configs name. The vendored code and the configs' ``_target_`` and
``$`` expressions are rewritten to ``scripts.``-prefixed names, so the unzipped bundle runs with
``python -m monai.bundle run --config_file configs/inference.json`` from its folder (``-m`` puts the
working directory first on ``sys.path``) without this repository installed. Run from elsewhere, the bundle
folder must be on PYTHONPATH: MONAI adds it to ``sys.path`` only in ``run``, after ``initialize`` has
already built what the ``initialize`` section needs.
"""
from __future__ import annotations

import ast
import hashlib
import json
import re
import zipfile
from pathlib import Path

import yaml

from brainage_core.options import as_dict
from brainage_core.volumes import InputError, atomic_path

REPO = Path(__file__).resolve().parents[1]
BUNDLES_DIR = REPO / "bundles"
VENDORED = ("brainage_core", "custom_components")  # this repository's runtime packages, copied into scripts/
SCRIPTS = "scripts"
COPIED = ("configs", "docs", "LICENSE", "large_files.yml")  # the Model Zoo layout, models/ aside
SCRIPTS_INIT = '"""This repository\'s code the bundle\'s configs use, vendored by workflows.packaging."""\n'
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed entry times: the same inputs give the same zip
_REF = re.compile(r"@[\w#]+")  # MONAI's @id#sub references, which are not Python
_FROM = re.compile(rb"from\s+")


def package_bundles(out_dir: str = "dist", bundles=("slice_cnn_brainage", "tgb_gan_augment"),
                    models_from: str | None = None, overrides=None, eval_metrics=None) -> list[str]:
    """Write each bundle in ``bundles`` as ``out_dir/<name>_v<version>.zip`` (version from metadata.json).

    Args:
        out_dir: folder for the zips.
        bundles: bundle names (folders under bundles/).
        models_from: a training run's ``--bundle_root`` (the folder holding its ``models/``) to take the
            weights from instead of the bundle folder; one bundle only.
        overrides: the ``--key value`` overrides the weights were trained with, as a dict (``{"image_size":
            [64, 64, 64], "network_def#aggregation": "attention"}``) or a JSON file of one: written into the
            packaged configs, so the unzipped bundle runs its weights with its defaults (as the Model Zoo's
            checks run it). ``image_size`` also sets the metadata's input (and image output) shape.
        eval_metrics: what the weights scored, as a JSON file of metric name -> value (a run's
            ``eval/test_metrics.json``) or a dict: its numbers replace metadata.json's ``eval_metrics``, each
            name prefixed with the file's name up to ``metrics`` (``test_metrics.json``: ``test_mae``).

    Every packaged large file gets its sha256 in the zip's ``large_files.yml`` (``hash_val``, ``hash_type``).
    """
    names = (bundles,) if isinstance(bundles, str) else tuple(bundles)
    if models_from is not None and len(names) != 1:
        raise InputError(f"models_from holds one run's weights: name one bundle with bundles, got {list(names)}")
    for option, value in (("overrides", overrides), ("eval_metrics", eval_metrics)):
        if value is not None and len(names) != 1:
            raise InputError(f"{option} belong to one run's weights: name one bundle with bundles, got {list(names)}")
    return [str(package_bundle(name, out_dir, models_from, _read_overrides(overrides), _read_metrics(eval_metrics)))
            for name in names]


def _read_overrides(overrides) -> dict:
    """``overrides`` as a dict: given as one, or the path of a JSON file holding one."""
    return {} if overrides is None else as_dict(overrides, "overrides", "id -> value")


def _read_metrics(eval_metrics) -> dict[str, float] | None:
    """``eval_metrics`` as metadata entries: the numbers of a dict, or of a JSON file's object with each name
    prefixed by the file's name up to ``metrics`` (``test_metrics.json`` -> ``test_``)."""
    if eval_metrics is None:
        return None
    content = as_dict(eval_metrics, "eval_metrics", "metric name -> number")
    prefix = "" if isinstance(eval_metrics, dict) else Path(str(eval_metrics)).stem.removesuffix("metrics")
    numbers = {f"{prefix}{key}": value for key, value in content.items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    if not numbers:
        raise InputError(f"eval_metrics {eval_metrics}: no metric values in it (a JSON object of name -> number)")
    return numbers


def _with_overrides(configs: dict[str, bytes], overrides: dict, bundle: str) -> dict[str, bytes]:
    """The configs with each ``a#b#c`` override written where its parent exists (a top-level key: where it is
    already set), and ``image_size`` into metadata.json's shapes; InputError for one no config has."""
    parsed = {arc: json.loads(data) for arc, data in configs.items()}
    unused = []
    for key, value in overrides.items():
        *parents, leaf = key.split("#")
        targets = []
        for arc, config in parsed.items():
            if arc.endswith("metadata.json"):
                continue
            node = config
            for part in parents:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and (parents or leaf in node):
                targets.append(node)
        for node in targets:
            node[leaf] = value
        if not targets:
            unused.append(key)
    if unused:
        raise InputError(f"{bundle}: no config of the bundle sets {', '.join(unused)}; check the override names")
    if "image_size" in overrides:
        formats = parsed["configs/metadata.json"]["network_data_format"]
        for item in [formats["inputs"]["image"], *[o for o in formats["outputs"].values() if o.get("type") == "image"]]:
            item["spatial_shape"] = list(overrides["image_size"])
    return {arc: (json.dumps(config, indent=4, ensure_ascii=False) + "\n").encode() if config != json.loads(configs[arc])
            else configs[arc] for arc, config in parsed.items()}


def package_bundle(name: str, out_dir: str = "dist", models_from: str | None = None, overrides: dict | None = None,
                   eval_metrics: dict[str, float] | None = None) -> Path:
    """Write one bundle's zip; see :func:`package_bundles`."""
    bundle = BUNDLES_DIR / name
    if not (bundle / "configs" / "metadata.json").is_file():
        known = sorted(p.name for p in BUNDLES_DIR.iterdir() if (p / "configs" / "metadata.json").is_file())
        raise InputError(f"no bundle {name!r}: {bundle / 'configs' / 'metadata.json'} is missing (bundles: {known})")
    version = json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
    files = {}  # path inside the bundle -> bytes
    for item in COPIED:
        if not (bundle / item).exists():
            raise InputError(f"{bundle} has no {item}; a Model Zoo bundle holds {', '.join(COPIED)}")
        for path in sorted((bundle / item).rglob("*")) if (bundle / item).is_dir() else [bundle / item]:
            if path.is_file() and "__pycache__" not in path.parts:
                files[path.relative_to(bundle).as_posix()] = path.read_bytes()
    configs = {arc: data for arc, data in files.items() if arc.startswith("configs/") and arc.endswith(".json")}
    configs = _with_overrides(configs, overrides or {}, name)
    files.update({arc: _config_bytes(bundle / arc, data) for arc, data in configs.items()})
    weights = _weights(bundle, Path(models_from) if models_from else bundle, configs)
    files.update(weights)
    files["large_files.yml"] = _hashed_large_files(files["large_files.yml"], weights)
    if eval_metrics is not None:
        meta = json.loads(files["configs/metadata.json"])
        meta["eval_metrics"] = eval_metrics
        files["configs/metadata.json"] = (json.dumps(meta, indent=4, ensure_ascii=False) + "\n").encode()
    files.update(_vendored_scripts(bundle, configs))
    out = Path(out_dir) / f"{name}_v{version}.zip"
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for arc, data in sorted(files.items()):
            entry = zipfile.ZipInfo(f"{name}/{arc}", date_time=ZIP_TIME)
            entry.external_attr = 0o644 << 16
            archive.writestr(entry, data, zipfile.ZIP_DEFLATED)
    return out


def _weights(bundle: Path, source: Path, configs: dict[str, bytes]) -> dict[str, bytes]:
    """The large files (large_files.yml) present under ``source``; refuse when one a config loads is absent.

    A config needs a large file when one of its expressions names it (``$os.path.join(@ckpt_dir,
    'model.pt')``); a plain value such as a saver's ``"key_metric_filename": "model.pt"`` writes it instead.
    """
    listed = [entry["path"] for entry in yaml.safe_load((bundle / "large_files.yml").read_text())["large_files"]]
    named = {arc: _code_strings(bundle / arc, json.loads(data)) for arc, data in configs.items()}
    found = {}
    for path in listed:
        if (source / path).is_file():
            found[path] = (source / path).read_bytes()
            continue
        users = [arc for arc, strings in named.items() if {path, Path(path).name} & strings]
        if users:
            raise InputError(
                f"{bundle.name}: {', '.join(users)} need {path}, which is not at {source / path}; train the bundle "
                f"into it (configs/train.json --bundle_root {source}) or package a run's weights with "
                f"`python -m workflows package-bundles --bundles {bundle.name} --models_from <the run's bundle_root>`"
            )
    return found


def _hashed_large_files(listing: bytes, weights: dict[str, bytes]) -> bytes:
    """large_files.yml with the sha256 of each packaged file; the others as listed."""
    if not weights:
        return listing
    content = yaml.safe_load(listing)
    for entry in content["large_files"]:
        if entry["path"] in weights:
            entry.update(hash_val=hashlib.sha256(weights[entry["path"]]).hexdigest(), hash_type="sha256")
    header = "# Written by workflows.packaging: the sha256 of each large file packaged in this zip.\n"
    return (header + yaml.safe_dump(content, sort_keys=False)).encode()


def _code_strings(config_file: Path, config) -> set[str]:
    """Every string literal inside the config's Python expressions."""
    return {node.value for code, _ in _code_items(config) for node in ast.walk(_parse(code, config_file))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def _code_items(config, key: str | None = None):
    """``(python_source, prefix_length)`` for each ``$`` expression and ``_target_`` path of a config."""
    if isinstance(config, dict):
        for k, value in config.items():
            yield from _code_items(value, k)
    elif isinstance(config, list):
        for value in config:
            yield from _code_items(value)
    elif (code := _code(config, key)) is not None:
        yield code


def _code(value, key: str | None) -> tuple[str, int] | None:
    """``(python_source, prefix_length)`` of one config value when it is Python: ``$...`` or a ``_target_``."""
    if isinstance(value, str) and value.startswith("$"):
        return value[1:], 1
    if isinstance(value, str) and key == "_target_":
        return value, 0
    return None


def _parse(code: str, origin: Path) -> ast.Module:
    """``code`` as a Python AST; MONAI's ``@id#sub`` references are masked by same-length names first."""
    masked = _REF.sub(lambda m: m.group().replace("@", "_").replace("#", "_"), code)
    try:
        return ast.parse(masked)
    except SyntaxError as err:
        raise InputError(f"{origin}: cannot read {code!r} as Python: {err.msg}") from None


def _scan(tree: ast.Module, module: str | None = None, is_package: bool = False) -> tuple[set[str], list[tuple]]:
    """Dotted names of this repository's modules that ``tree`` refers to, and the ``(line, column)``
    places where ``scripts.`` must be inserted: absolute imports of them and names bound to them.

    ``module`` (with ``is_package``) is the vendored module ``tree`` comes from (None for a config); it
    resolves relative imports, which stay as written in the vendored copy.
    """
    refs, places, names, bound = set(), [], [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in VENDORED:
                    refs.add(alias.name)
                    places.append((alias.lineno, alias.col_offset))
                    if not alias.asname:  # ``import pkg.mod`` binds the name ``pkg``
                        bound.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            elif base.split(".")[0] in VENDORED:
                places.append((node.lineno, node.col_offset, "from"))
            if base.split(".")[0] in VENDORED:
                refs.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Attribute) and (dotted := _dotted(node)) and dotted.split(".")[0] in VENDORED:
            refs.add(dotted)
        elif isinstance(node, ast.Name) and node.id in VENDORED and isinstance(node.ctx, ast.Load):
            refs.add(node.id)
            names.append(node)
    # a bare package name is the package in a config; in a module only where ``import pkg...`` bound it
    places += [(n.lineno, n.col_offset) for n in names if module is None or n.id in bound]
    return refs, places


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for an attribute chain on a plain name, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute) and (inner := _dotted(node.value)):
        return f"{inner}.{node.attr}"
    return None


def _prefixed(code: str, places: list[tuple]) -> str:
    """``code`` with ``scripts.`` inserted at ``places`` (AST line/byte-column; "from" marks a from-import)."""
    data = code.encode()
    line_starts = [0] + [m.end() for m in re.finditer(rb"\n", data)]
    offsets = []
    for line, column, *kind in places:
        offset = line_starts[line - 1] + column
        if kind:  # the module name follows "from" and its spacing
            offset = _FROM.match(data, offset).end()
        offsets.append(offset)
    for offset in sorted(offsets, reverse=True):
        data = data[:offset] + f"{SCRIPTS}.".encode() + data[offset:]
    return data.decode()


def _rewrite_config(config, origin: Path, key: str | None = None):
    """The config with ``scripts.``-prefixed references in its ``$`` expressions and ``_target_`` paths."""
    if isinstance(config, dict):
        return {k: _rewrite_config(value, origin, k) for k, value in config.items()}
    if isinstance(config, list):
        return [_rewrite_config(value, origin) for value in config]
    if (code := _code(config, key)) is None:
        return config
    source, skip = code
    return config[:skip] + _prefixed(source, _scan(_parse(source, origin))[1])


def _config_bytes(config_file: Path, data: bytes) -> bytes:
    """A JSON config rewritten for the vendored ``scripts``; byte-identical when it names none of this code."""
    config = json.loads(data)
    rewritten = _rewrite_config(config, config_file)
    return data if rewritten == config else (json.dumps(rewritten, indent=4, ensure_ascii=False) + "\n").encode()


def _module_file(name: str) -> Path | None:
    """The source file of module ``name`` in this repository, or None when ``name`` is not a module."""
    base = REPO.joinpath(*name.split("."))
    return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)


def _owning_module(ref: str) -> str:
    """The module a dotted reference lives in: its longest prefix that is a module of this repository."""
    parts = ref.split(".")
    return next(".".join(parts[:n]) for n in range(len(parts), 0, -1) if _module_file(".".join(parts[:n])))


def _vendored_scripts(bundle: Path, configs: dict[str, bytes]) -> dict[str, bytes]:
    """``scripts/...`` files: the modules the configs name, their imports followed transitively (with
    their parent packages), rewritten to ``scripts.`` names; plus ``scripts/__init__.py``."""
    todo = {_owning_module(ref) for arc, data in configs.items() for code, _ in _code_items(json.loads(data))
            for ref in _scan(_parse(code, bundle / arc))[0]}
    done, files = set(), {f"{SCRIPTS}/__init__.py": SCRIPTS_INIT.encode()}
    while todo:
        module = todo.pop()
        parts = module.split(".")
        todo |= {".".join(parts[:n]) for n in range(1, len(parts))} - done  # parent packages run on import
        done.add(module)
        path = _module_file(module)
        source = path.read_text()
        refs, places = _scan(ast.parse(source, filename=str(path)), module, path.name == "__init__.py")
        todo |= {_owning_module(ref) for ref in refs} - done
        files[f"{SCRIPTS}/{path.relative_to(REPO).as_posix()}"] = _prefixed(source, places).encode()
    return files
