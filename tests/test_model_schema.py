"""One schema, two validators: every metadata field mutated (missing, wrong type, wrong value)
is refused by Python (read_metadata) and by the plugin (pair_coeff) with the same message
naming the field; a corrupted network fails its CRC-32 on both sides; version 1 files still load."""

from __future__ import annotations

import copy
import io
import json
import re
import zipfile

import numpy as np
import pytest
import torch

from efa_deploy.lammps import start_lammps
from efa_deploy.model import ModelConfig
from efa_deploy.model_schema import FORMAT_VERSION, SCHEMA, network_crc32
from efa_deploy.modelfile import (METADATA_NAME, MetadataError, load_model_file, model_metadata, read_metadata,
                                  save_model_file)
from efa_deploy.ops import called_operators

from helpers import FINITE_SETUP, jittered_cluster, randomised_model, run_lammps, write_data

DELETE = object()


class WithInput:
    """A value of a `with_input` field, in metadata whose 'inputs' holds that input."""

    def __init__(self, input_name: str, value):
        self.input_name, self.value = input_name, value

    def __repr__(self) -> str:
        return f"with {self.input_name}: {'missing' if self.value is DELETE else json.dumps(self.value)}"


def mutate(metadata: dict, name: str, value) -> dict:
    metadata = copy.deepcopy(metadata)
    if isinstance(value, WithInput):
        metadata["inputs"] = [*metadata["inputs"], value.input_name]
        value = value.value
    *parents, leaf = name.split(".")
    target = metadata
    for part in parents:
        target = target[part]
    if value is DELETE:
        target.pop(leaf, None)
    else:
        target[leaf] = value
    return metadata


# (field, new value, what the message says about it)
MUTATIONS = [
    ("format", DELETE, "is missing"),
    ("format", "torchmd", 'must be "efa-deploy-model", got "torchmd"'),
    ("format_version", DELETE, "is missing"),
    ("format_version", "2", "should be an integer, got string"),
    ("format_version", 99, f"must be <= {FORMAT_VERSION}, got 99"),
    ("format_version", 1, "must be >= 2, got 1; a newer file needs a newer efa-deploy; convert an older one with 'efa-export --from-model OLD.pt -o NEW.pt'"),
    ("elements", DELETE, "is missing"),
    ("elements", [1, 6, 8], "should be a string, got integer"),
    ("elements", [], "must hold at least 1 item(s), got 0"),
    ("elements", ["H", "H", "O"], "must not repeat a value"),
    ("elements", "HCO", "should be a list, got string"),
    ("atomic_numbers", DELETE, "is missing"),
    ("atomic_numbers", ["1", "6", "8"], "should be an integer, got string"),
    ("atomic_numbers", [1, 6], "must be as long as 'elements'"),
    ("atomic_numbers", [0, 6, 8], "must be >= 1, got 0"),
    ("cutoff", DELETE, "is missing"),
    ("cutoff", "4.0", "should be a number, got string"),
    ("cutoff", -4.0, "must be > 0, got -4.0"),
    ("num_layers", 0, "must be >= 1, got 0"),
    ("num_layers", 2.5, "should be an integer, got number"),
    ("inputs", DELETE, "is missing"),
    ("inputs", ["species", "positions", "edge_index", "edge_shift", "batch", "n_structures", "owned"], "must be ["),
    ("ghost_width", DELETE, "is missing"),
    ("ghost_width", "32", "should be an integer, got string"),
    ("ops", DELETE, "is missing"),
    ("ops", "efa::global_sum", "should be a list, got string"),
    ("ops", ["efa::global_sum", 3], "should be a string, got integer"),
    ("efa", DELETE, "is missing"),
    ("efa", [], "should be an object, got array"),
    ("efa.enabled", DELETE, "is missing"),
    ("efa.enabled", "yes", "should be true or false, got string"),
    ("efa.r_max", DELETE, "is missing"),
    ("efa.r_max", "20", "should be a number, got string"),
    ("efa.r_max", 0, "must be > 0, got 0"),
    ("efa.grid_points", DELETE, "is missing"),
    ("efa.grid_rules", DELETE, "is missing"),
    ("efa.grid_rules", [50, 26], "must be strictly ascending"),
    ("efa.grid_rules", [0], "must be >= 1, got 0"),
    ("efa.frequencies", [0.0, None], "should be a number, got null"),
    ("dtype", "float16", 'must be "float32" or "float64", got "float16"'),
    ("units", "eV", "should be an object, got string"),
    ("units.energy", "kcal/mol", 'must be "eV", got "kcal/mol"'),
    ("units.length", DELETE, "is missing"),
    ("periodic", "false", "should be true or false, got string"),
    ("periodic", True, "must be false when 'efa.enabled' is true"),
    ("network_crc32", DELETE, "is missing"),
    ("network_crc32", "XYZ", 'must be 8 lowercase hexadecimal digits, got "XYZ"'),
    ("network_crc32", "00000000", "does not match the network"),
    ("config", DELETE, "is missing"),
    ("config.features", "8", "should be an integer, got string"),
    ("provenance", DELETE, "is missing"),
    ("provenance.package_version", 1, "should be a string, got integer"),
]
RIGHT_TYPE = {"string": "x", "integer": 7, "number": 1.5, "boolean": True, "array": [], "object": {}}
WRONG_TYPE = {"string": 7, "integer": "7", "number": "7.0", "boolean": "true", "array": {"a": 1}, "object": [1]}


def wrong_value(spec: dict, good):
    """A value of the right type that breaks one of the field's rules (None when it has none)."""
    if "enum" in spec:
        return ["x"] if spec["type"] == "array" else "x"
    if spec["type"] == "array":
        if spec.get("ascending"):
            return list(reversed(good)) if len(good) > 1 else [2, 1]
        if spec.get("unique"):
            return [good[0], good[0]]
        return [] if spec.get("min_items") else None
    for rule, bad in (("minimum", lambda b: b - 1), ("exclusive_minimum", lambda b: b), ("maximum", lambda b: b + 1)):
        if rule in spec:
            return bad(spec[rule])
    if "hex_digits" in spec:
        return "z" * spec["hex_digits"]
    return True if "false_if" in spec else None


def schema_mutations(metadata: dict) -> list:
    """Every field of the schema: missing, of a wrong type, and (where it has a rule) of a wrong value."""
    from efa_deploy.model_schema import lookup

    cases = []
    for spec in SCHEMA["fields"]:
        name = spec["name"]
        if "with_input" in spec:  # there exactly when 'inputs' holds the input (global_inputs)
            needs = spec["with_input"]
            cases += [(name, WithInput(needs, DELETE), f"is missing: the model takes the input '{needs}'"),
                      (name, WithInput(needs, WRONG_TYPE[spec["type"]]), "should be"),
                      (name, WithInput(needs, wrong_value(spec, None)), "must be"),
                      (name, spec.get("enum", [RIGHT_TYPE[spec["type"]]])[0],
                       f"is set but 'inputs' does not hold '{needs}'")]
            continue
        good = lookup(metadata, name)[1]
        cases.append((name, DELETE, "is missing"))
        cases.append((name, WRONG_TYPE[spec["type"]], "should be"))
        bad = wrong_value(spec, good)
        if bad is not None:
            cases.append((name, bad, "must"))
    return cases


CONFIG = ModelConfig(atomic_numbers=[1, 6, 8], features=8, num_layers=2, cutoff=4.0, r_max=20.0)
MODEL = randomised_model(CONFIG, seed=3)
SCRIPTED = torch.jit.script(MODEL.eval())
METADATA = model_metadata(MODEL, CONFIG, ops=called_operators(SCRIPTED))
MUTATIONS += schema_mutations(METADATA)
UNKNOWN_OPERATOR = ("metadata field 'ops' names operator 'efa::no_such_op', which is not registered in this process; "
                    "the model needs an operator this build of libefa_ops lacks: upgrade efa-deploy and rebuild it")
IDS = [f"{name} {'missing' if value is DELETE else value if isinstance(value, WithInput) else json.dumps(value)}"[:50]
       for name, value, _ in MUTATIONS]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("schema")
    model, config = MODEL, CONFIG
    save_model_file(model, config, root / "good.pt")
    scripted, metadata = SCRIPTED, copy.deepcopy(METADATA)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer, _extra_files={METADATA_NAME: "{}"})
    with zipfile.ZipFile(buffer) as z:
        metadata["network_crc32"] = network_crc32({i.filename.split("/", 1)[1]: z.read(i) for i in z.infolist()})

    def write(name: str, text: str):
        path = root / name
        torch.jit.save(scripted, str(path), _extra_files={METADATA_NAME: text})
        return path

    mutated = [write(f"mutation{k}.pt", json.dumps(mutate(metadata, name, value)))
               for k, (name, value, _) in enumerate(MUTATIONS)]
    extra = {
        "nan": (write("nan.pt", json.dumps(metadata).replace('"cutoff": 4.0', '"cutoff": NaN')),
                "metadata.json is not valid JSON"),
        "list": (write("list.pt", "[1, 2]"), "metadata should be an object, got array"),
        "flipped": (flip_a_network_byte(root / "good.pt", root / "flipped.pt"),
                    "metadata field 'network_crc32' does not match the network: the file is corrupt"),
        "unknown operator": (write("unknown_op.pt", json.dumps({**metadata, "ops": [*metadata["ops"], "efa::no_such_op"]})),
                             UNKNOWN_OPERATOR),
    }
    v1 = {k: v for k, v in metadata.items() if k not in ("inputs", "ghost_width", "ops", "network_crc32")}
    v1["format_version"] = 1
    v1["efa"] = {k: v for k, v in v1["efa"].items() if k != "grid_rules"}
    v1["provenance"] = {"package_version": "0.1.0"}
    data = write_data(jittered_cluster(20, seed=4), root / "data.lmp", ["H", "C", "O"])
    v2 = {**{k: v for k, v in metadata.items() if k != "ops"}, "format_version": 2}
    return {"mutated": mutated, "extra": extra, "v1": write("v1.pt", json.dumps(v1)), "v2": write("v2.pt", json.dumps(v2)),
            "good": root / "good.pt", "data": data}


def flip_a_network_byte(source, target):
    """Flip one byte in the middle of the largest tensor record; the file keeps its length."""
    raw = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    start = info.header_offset + 30 + int.from_bytes(raw[info.header_offset + 26:info.header_offset + 28], "little") \
        + int.from_bytes(raw[info.header_offset + 28:info.header_offset + 30], "little")
    raw[start + info.file_size // 2] ^= 0x40
    target.write_bytes(bytes(raw))
    assert target.stat().st_size == source.stat().st_size
    return target


def python_message(path) -> str:
    with pytest.raises(ValueError) as info:
        read_metadata(path)
    return str(info.value)


@pytest.fixture(scope="module")
def plugin_messages(files):
    """Every file through pair_coeff in one LAMMPS instance in this process, which survives them all."""
    lmp = start_lammps()
    lmp.commands_string(f"units metal\nboundary f f f\natom_style atomic\nread_data {files['data']}\npair_style efa")
    messages = {}
    for path in [*files["mutated"], *(p for p, _ in files["extra"].values()), files["v1"], files["v2"], files["good"]]:
        try:
            lmp.command(f"pair_coeff * * {path} H C O")
            messages[path] = None
        except Exception as err:
            messages[path] = re.sub(r" \([^()]*:\d+\)$", "", str(err).strip().splitlines()[0])
    lmp.command(f"pair_coeff * * {files['good']} H C O")
    lmp.command("run 0")
    messages["energy"] = lmp.get_thermo("pe")
    lmp.close()
    return messages


@pytest.mark.parametrize("k", range(len(MUTATIONS)), ids=IDS)
def test_both_sides_refuse_a_mutated_field_with_the_same_message(files, plugin_messages, k):
    name, _, expected = MUTATIONS[k]
    path = files["mutated"][k]
    python = python_message(path)
    assert f"metadata field '{name}" in python and expected in python  # list items are named name[i]
    plugin = plugin_messages[path]
    assert plugin is not None and plugin.endswith(python), (plugin, python)


@pytest.mark.parametrize("case", ["nan", "list", "flipped", "unknown operator"])
def test_both_sides_refuse_nan_a_non_object_a_corrupted_network_and_an_unknown_operator(files, plugin_messages, case):
    path, expected = files["extra"][case]
    assert expected in python_message(path)
    assert expected in plugin_messages[path]
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_model_file(path)  # before torch.jit.load, which would fail on the operator with a C++ trace


def test_lmp_on_two_ranks_refuses_an_unknown_operator_with_the_fix(files, tmp_path):
    path, expected = files["extra"]["unknown operator"]
    (tmp_path / "data.lmp").write_bytes(files["data"].read_bytes())
    deck = FINITE_SETUP.format(pair_args="", model=path, elements="H C O") + "run 0\n"
    with pytest.raises(RuntimeError) as failed:
        run_lammps(deck, tmp_path, nprocs=2, timeout=120)
    assert f"ERROR: pair_style efa: {path}: {expected}" in str(failed.value)


def test_a_file_listing_only_registered_operators_loads_on_both_sides(files, plugin_messages):
    """The negative control of the unknown operator: the same network and list without it; and a
    version 2 file, which predates the list, loads unchecked."""
    assert read_metadata(files["good"])["ops"] == METADATA["ops"]
    assert "ops" not in read_metadata(files["v2"])
    assert plugin_messages[files["good"]] is None and plugin_messages[files["v2"]] is None


def test_version_1_files_are_refused_on_both_sides_with_the_conversion(files, plugin_messages):
    """A version 1 file carries no Lebedev rules (no run-time grid): both sides name the fix."""
    fix = "convert an older one with 'efa-export --from-model OLD.pt -o NEW.pt'"
    with pytest.raises(MetadataError, match=re.escape(fix)):
        read_metadata(files["v1"])
    assert fix in plugin_messages[files["v1"]]
    assert plugin_messages[files["good"]] is None and np.isfinite(plugin_messages["energy"])


def test_writer_refuses_nan_in_weights_and_metadata(tmp_path):
    config = ModelConfig(atomic_numbers=[1, 8], features=8, num_layers=1, cutoff=3.0, r_max=10.0)
    model = randomised_model(config)
    with pytest.raises(ValueError, match=r"metadata field 'provenance.validation.energy_mae' is NaN or inf"):
        save_model_file(model, config, tmp_path / "a.pt", provenance={"validation": {"energy_mae": float("nan")}})
    with torch.no_grad():
        model.readout[0].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"model weight 'readout.0.weight' holds NaN or inf"):
        save_model_file(model, config, tmp_path / "b.pt")
    assert not any(tmp_path.iterdir())  # nothing half-written
