#include "model_schema.h"

#include "json.h"
#include "model_schema_data.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <caffe2/serialize/inline_container.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <set>

using LAMMPS_NS::json;

namespace efa {

namespace {

constexpr const char *METADATA_RECORD = "extra/metadata.json";
constexpr const char *SERIALIZATION_ID_RECORD = ".data/serialization_id";

const json &schema()
{
  static const json parsed = json::parse(MODEL_SCHEMA_JSON);
  return parsed;
}

struct Failure {
  std::string message;
};

[[noreturn]] void fail(const std::string &name, const json &spec, const std::string &message)
{
  std::string text = "metadata field '" + name + "' " + message;
  if (spec.contains("hint")) text += "; " + spec["hint"].get<std::string>();
  throw Failure{text};
}

std::string kind_of(const json &value)
{
  if (value.is_null()) return "null";
  if (value.is_boolean()) return "boolean";
  if (value.is_number_integer()) return "integer";
  if (value.is_number()) return "number";
  if (value.is_string()) return "string";
  return value.is_array() ? "array" : "object";
}

std::string description(const std::string &kind)
{
  if (kind == "string") return "a string";
  if (kind == "integer") return "an integer";
  if (kind == "number") return "a number";
  if (kind == "boolean") return "true or false";
  if (kind == "array") return "a list";
  return "an object";
}

const json *lookup(const json &metadata, const std::string &name)
{
  const json *value = &metadata;
  size_t start = 0;
  while (true) {
    const size_t dot = name.find('.', start);
    const std::string part = name.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    if (!value->is_object() || !value->contains(part)) return nullptr;
    value = &value->at(part);
    if (dot == std::string::npos) return value;
    start = dot + 1;
  }
}

bool is_true(const json *value) { return value != nullptr && value->is_boolean() && value->get<bool>(); }

void check_value(const std::string &name, const json &value, const json &spec, const std::string &expected)
{
  const std::string kind = kind_of(value);
  if (!(kind == expected || (expected == "number" && kind == "integer")))
    fail(name, spec, "should be " + description(expected) + ", got " + kind);
  if (kind == "number" && !std::isfinite(value.get<double>())) fail(name, spec, "must be finite");
  if (kind == "integer" || kind == "number") {
    const double x = value.get<double>();
    if (spec.contains("minimum") && x < spec["minimum"].get<double>())
      fail(name, spec, "must be >= " + spec["minimum"].dump() + ", got " + value.dump());
    if (spec.contains("exclusive_minimum") && x <= spec["exclusive_minimum"].get<double>())
      fail(name, spec, "must be > " + spec["exclusive_minimum"].dump() + ", got " + value.dump());
    if (spec.contains("maximum") && x > spec["maximum"].get<double>())
      fail(name, spec, "must be <= " + spec["maximum"].dump() + ", got " + value.dump());
  }
}

// Whether the metadata's 'inputs' list holds `input`.
bool takes_input(const json &metadata, const std::string &input)
{
  const json *inputs = lookup(metadata, "inputs");
  return inputs != nullptr && inputs->is_array() && std::find(inputs->begin(), inputs->end(), json(input)) != inputs->end();
}

void check_field(const json &metadata, const std::string &name, const json &value, const json &spec)
{
  const std::string type = spec["type"].get<std::string>();
  check_value(name, value, spec, type);
  if (spec.contains("enum")) {
    bool allowed = false;
    std::string choices;
    for (const auto &option : spec["enum"]) {
      allowed = allowed || (kind_of(option) == kind_of(value) && option == value);
      choices += (choices.empty() ? "" : " or ") + option.dump();
    }
    if (!allowed) fail(name, spec, "must be " + choices + ", got " + value.dump());
  }
  if (type == "array") {
    for (size_t i = 0; i < value.size(); i++)
      check_value(name + "[" + std::to_string(i) + "]", value[i], spec, spec["items"].get<std::string>());
    if (spec.contains("min_items") && value.size() < spec["min_items"].get<size_t>())
      fail(name, spec, "must hold at least " + spec["min_items"].dump() + " item(s), got " + std::to_string(value.size()));
    if (spec.value("unique", false)) {
      std::set<std::string> seen;
      for (const auto &item : value) seen.insert(item.dump());
      if (seen.size() != value.size()) fail(name, spec, "must not repeat a value");
    }
    if (spec.value("ascending", false))
      for (size_t i = 0; i + 1 < value.size(); i++)
        if (value[i].get<double>() >= value[i + 1].get<double>()) fail(name, spec, "must be strictly ascending");
    if (spec.contains("same_length_as")) {
      const std::string other = spec["same_length_as"].get<std::string>();
      const json *reference = lookup(metadata, other);
      if (reference != nullptr && reference->size() != value.size())
        fail(name, spec, "must be as long as '" + other + "'");
    }
  }
  if (spec.contains("hex_digits")) {
    const std::string text = value.get<std::string>();
    const bool hex = text.size() == spec["hex_digits"].get<size_t>() &&
        std::all_of(text.begin(), text.end(), [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
    if (!hex) fail(name, spec, "must be " + spec["hex_digits"].dump() + " lowercase hexadecimal digits, got " + value.dump());
  }
  if (spec.contains("false_if")) {
    const std::string other = spec["false_if"].get<std::string>();
    const std::string unless = spec.value("unless_input", "");
    if (value.get<bool>() && is_true(lookup(metadata, other)) && !(unless.size() && takes_input(metadata, unless)))
      fail(name, spec, "must be false when '" + other + "' is true" +
                           (unless.size() ? " and 'inputs' does not hold '" + unless + "'" : ""));
  }
}

// A field that is there exactly when 'inputs' holds the name `with_input`; returns whether it is there.
bool check_with_input(const json &metadata, const std::string &name, bool present, const json &spec)
{
  const std::string input = spec["with_input"].get<std::string>();
  const bool needed = takes_input(metadata, input);
  if (needed && !present) fail(name, spec, "is missing: the model takes the input '" + input + "'");
  if (present && !needed) fail(name, spec, "is set but 'inputs' does not hold '" + input + "'");
  return present;
}

// CRC-32 (the zlib polynomial), continued from `crc` as zlib.crc32(data, crc) does
uint32_t crc32(uint32_t crc, const void *data, size_t size)
{
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t n = 0; n < 256; n++) {
      uint32_t c = n;
      for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[n] = c;
    }
    return t;
  }();
  const auto *bytes = static_cast<const unsigned char *>(data);
  crc = ~crc;
  for (size_t i = 0; i < size; i++) crc = table[(crc ^ bytes[i]) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

const json &field_spec(const std::string &name)
{
  const json &fields = schema()["fields"];
  return *std::find_if(fields.begin(), fields.end(), [&](const json &spec) { return spec["name"] == name; });
}

// the version writers write: the newest one this build reads
int newest_format_version() { return field_spec("format_version")["maximum"].get<int>(); }

}  // namespace

std::string check_metadata(const json &metadata)
{
  if (!metadata.is_object()) return "metadata should be an object, got " + kind_of(metadata);
  try {
    int64_t version = newest_format_version();
    for (const auto &spec : schema()["fields"]) {
      const std::string name = spec["name"].get<std::string>();
      if (spec.contains("required_if") && !is_true(lookup(metadata, spec["required_if"].get<std::string>())))
        continue;
      const json *value = lookup(metadata, name);
      if (spec.contains("with_input") && !check_with_input(metadata, name, value != nullptr, spec)) continue;
      if (value == nullptr) {
        if (version >= spec.value("since_version", 0)) fail(name, spec, "is missing");
        continue;
      }
      check_field(metadata, name, *value, spec);
      if (name == "format_version") version = value->get<int64_t>();
    }
  } catch (const Failure &failure) {
    return failure.message;
  }
  return "";
}

std::string check_operators(const json &metadata)
{
  const json *ops = lookup(metadata, "ops");
  if (ops == nullptr) return "";
  for (const auto &op : *ops) {
    const std::string name = op.get<std::string>();
    if (!c10::Dispatcher::singleton().findSchema(c10::OperatorName(name, "")).has_value())
      return "metadata field 'ops' names operator '" + name + "', which is not registered in this process; " +
          field_spec("ops")["unregistered_hint"].get<std::string>();
  }
  return "";
}

std::string read_model_zip(const std::string &path, std::string &metadata)
{
  caffe2::serialize::PyTorchStreamReader reader(path);
  std::vector<std::string> names = reader.getAllRecords();
  std::sort(names.begin(), names.end());
  metadata.clear();
  uint32_t crc = 0;
  for (const auto &name : names) {
    if (name == SERIALIZATION_ID_RECORD) continue;
    auto [data, size] = reader.getRecord(name);
    if (name == METADATA_RECORD) {
      metadata.assign(static_cast<const char *>(data.get()), size);
      continue;
    }
    crc = crc32(crc, name.c_str(), name.size() + 1);  // the name and its terminating zero
    if (size > 0) crc = crc32(crc, data.get(), size);
  }
  char hex[9];
  std::snprintf(hex, sizeof(hex), "%08x", crc);
  return hex;
}

}  // namespace efa
