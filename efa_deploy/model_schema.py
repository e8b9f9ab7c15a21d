"""The metadata schema of a model file (model_schema.json) and its validator.

The schema is one JSON file, read here and embedded into the LAMMPS plugin at build time,
where lammps_plugin/model_schema.cpp applies the same rules with the same messages; the rule
language is described in docs/model-format.md. Nothing here needs torch.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from pathlib import Path
from typing import Callable

SCHEMA_PATH = Path(__file__).resolve().parent / "model_schema.json"
SCHEMA: dict = json.loads(SCHEMA_PATH.read_text())
FIELDS: dict = {spec["name"]: spec for spec in SCHEMA["fields"]}
# the version writers write: the newest one readers accept
FORMAT_VERSION: int = FIELDS["format_version"]["maximum"]
METADATA_RECORD = "extra/metadata.json"
# zip records outside the network digest: the metadata holding it, and a per-save random id
UNDIGESTED_RECORDS = (METADATA_RECORD, ".data/serialization_id")

DESCRIPTION = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "true or false",
               "array": "a list", "object": "an object"}


class MetadataError(ValueError):
    """A metadata field breaks the schema; the message names the field."""


def json_dump(value) -> str:
    """Compact JSON, as the plugin's nlohmann::json::dump() writes it, for identical messages."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def json_kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def lookup(metadata: dict, name: str) -> tuple[bool, object]:
    """(present, value) of a dotted field name."""
    value = metadata
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _fail(name: str, spec: dict, message: str):
    hint = spec.get("hint")
    raise MetadataError(f"metadata field '{name}' {message}" + (f"; {hint}" if hint else ""))


def _check_value(name: str, value, spec: dict, kind_expected: str) -> None:
    kind = json_kind(value)
    if not (kind == kind_expected or (kind_expected == "number" and kind == "integer")):
        _fail(name, spec, f"should be {DESCRIPTION[kind_expected]}, got {kind}")
    if kind == "number" and not math.isfinite(value):
        _fail(name, spec, "must be finite")
    if kind in ("integer", "number"):
        if "minimum" in spec and value < spec["minimum"]:
            _fail(name, spec, f"must be >= {json_dump(spec['minimum'])}, got {json_dump(value)}")
        if "exclusive_minimum" in spec and value <= spec["exclusive_minimum"]:
            _fail(name, spec, f"must be > {json_dump(spec['exclusive_minimum'])}, got {json_dump(value)}")
        if "maximum" in spec and value > spec["maximum"]:
            _fail(name, spec, f"must be <= {json_dump(spec['maximum'])}, got {json_dump(value)}")


def _check_field(metadata: dict, name: str, value, spec: dict) -> None:
    _check_value(name, value, spec, spec["type"])
    if "enum" in spec and not any(json_kind(value) == json_kind(e) and value == e for e in spec["enum"]):
        _fail(name, spec, f"must be {' or '.join(json_dump(e) for e in spec['enum'])}, got {json_dump(value)}")
    if spec["type"] == "array":
        for i, item in enumerate(value):
            _check_value(f"{name}[{i}]", item, spec, spec["items"])
        if len(value) < spec.get("min_items", 0):
            _fail(name, spec, f"must hold at least {spec['min_items']} item(s), got {len(value)}")
        if spec.get("unique") and len({json_dump(v) for v in value}) != len(value):
            _fail(name, spec, "must not repeat a value")
        if spec.get("ascending") and any(a >= b for a, b in zip(value, value[1:])):
            _fail(name, spec, "must be strictly ascending")
        if "same_length_as" in spec:
            present, other = lookup(metadata, spec["same_length_as"])
            if present and len(other) != len(value):
                _fail(name, spec, f"must be as long as '{spec['same_length_as']}'")
    if "hex_digits" in spec and not re.fullmatch(f"[0-9a-f]{{{spec['hex_digits']}}}", value):
        _fail(name, spec, f"must be {spec['hex_digits']} lowercase hexadecimal digits, got {json_dump(value)}")
    if "false_if" in spec and value is True and lookup(metadata, spec["false_if"])[1] is True:
        unless = spec.get("unless_input")
        if not (unless and _takes_input(metadata, unless)):
            _fail(name, spec, f"must be false when '{spec['false_if']}' is true"
                  + (f" and 'inputs' does not hold '{unless}'" if unless else ""))


def _takes_input(metadata: dict, name: str) -> bool:
    inputs = lookup(metadata, "inputs")[1]
    return isinstance(inputs, list) and name in inputs


def _check_with_input(metadata: dict, name: str, present: bool, spec: dict) -> bool:
    """A field that is there exactly when 'inputs' holds the name `with_input`; returns whether
    it is there."""
    needed = _takes_input(metadata, spec["with_input"])
    if needed and not present:
        _fail(name, spec, f"is missing: the model takes the input '{spec['with_input']}'")
    if present and not needed:
        _fail(name, spec, f"is set but 'inputs' does not hold '{spec['with_input']}'")
    return present


def validate_metadata(metadata) -> dict:
    """Check every field the schema lists, in its order; raise MetadataError naming the first
    bad one. Fields a file's format_version predates are optional; fields whose
    `required_if` flag is false are not read."""
    if not isinstance(metadata, dict):
        raise MetadataError(f"metadata should be an object, got {json_kind(metadata)}")
    version = FORMAT_VERSION
    for spec in SCHEMA["fields"]:
        name = spec["name"]
        if "required_if" in spec and lookup(metadata, spec["required_if"])[1] is not True:
            continue
        present, value = lookup(metadata, name)
        if "with_input" in spec and not _check_with_input(metadata, name, present, spec):
            continue
        if not present:
            if version >= spec.get("since_version", 0):
                _fail(name, spec, "is missing")
            continue
        _check_field(metadata, name, value, spec)
        if name == "format_version":
            version = value
    return metadata


def check_operators(metadata: dict, registered: Callable[[str], bool]) -> None:
    """Raise MetadataError naming the first operator of the field 'ops' that `registered` does
    not know (the plugin asks the c10 dispatcher the same); files older than 'ops' list none."""
    for name in metadata.get("ops", []):
        if not registered(name):
            raise MetadataError(f"metadata field 'ops' names operator '{name}', which is not registered in this "
                                f"process; {FIELDS['ops']['unregistered_hint']}")


def parse_metadata(text: str | bytes) -> dict:
    """json.loads that refuses NaN and Infinity, as the plugin's parser does."""
    def reject(constant):
        raise ValueError(f"{constant} is not valid JSON")

    return json.loads(text, parse_constant=reject)


def network_crc32(records: dict[str, bytes]) -> str:
    """CRC-32 of a model file's network: every zip record but UNDIGESTED_RECORDS, by name in byte
    order, each fed as its name, a zero byte and its bytes. `records` maps names inside the
    archive folder (data/0, code/...) to bytes."""
    crc = 0
    for name in sorted(records, key=lambda n: n.encode()):
        if name in UNDIGESTED_RECORDS:
            continue
        crc = zlib.crc32(records[name], zlib.crc32(name.encode() + b"\0", crc))
    return f"{crc:08x}"
