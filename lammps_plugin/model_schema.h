// The model file's metadata schema (efa_deploy/model_schema.json, embedded at build time)
// and the CRC-32 of its network: the same rules and messages as efa_deploy/model_schema.py.
#pragma once

#include "json_fwd.h"

#include <string>

namespace efa {

// "" when `metadata` passes every rule of the schema, else the message naming the first bad field.
std::string check_metadata(const LAMMPS_NS::json &metadata);

// "" when every operator of the field 'ops' is registered with the c10 dispatcher, else the
// message naming the first that is not (check_operators in model_schema.py).
std::string check_operators(const LAMMPS_NS::json &metadata);

// CRC-32 of the network records of a TorchScript zip (see network_crc32 in model_schema.py),
// as 8 lowercase hexadecimal digits; `metadata` receives the text of extra/metadata.json
// ("" when there is none). Throws c10::Error for a file that is not a TorchScript zip.
std::string read_model_zip(const std::string &path, std::string &metadata);

}  // namespace efa
