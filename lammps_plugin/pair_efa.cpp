#include "pair_efa.h"

#include "atom.h"
#include "comm.h"
#include "domain.h"
#include "error.h"
#include "force.h"
#include "json.h"
#include "memory.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "platform.h"
#include "update.h"
#include "utils.h"

#include "efa_ops.h"
#include "model_schema.h"

#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/cuda.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <thread>
#include <chrono>

using namespace LAMMPS_NS;

namespace {

constexpr const char *METADATA_NAME = "metadata.json";
// atoms closer than this (A) are named when the model's results are not finite
constexpr double CLOSE_CONTACT = 0.5;
constexpr double KCAL_PER_MOL_PER_EV = 23.060547830619026;  // CODATA 2018

// Backs the torch.ops.efa collectives with MPI and LAMMPS ghost communication.
class LammpsComm : public efa::CommBackend {
 public:
  LammpsComm(PairEFA *pair, MPI_Comm world, bool skip_backward_sum, bool inject_failure)
      : pair_(pair), world_(world), skip_backward_sum_(skip_backward_sum), inject_failure_(inject_failure) {}

  bool in_backward = false;

  void global_sum(torch::Tensor &t) override
  {
    if (in_backward && skip_backward_sum_) return;
    if (inject_failure_) throw std::runtime_error("failure injected by EFA_TEST_FAIL_ON_RANK");
    torch::Tensor host = t.to(torch::kCPU, torch::kFloat64).contiguous();
    MPI_Allreduce(MPI_IN_PLACE, host.data_ptr<double>(), static_cast<int>(host.numel()), MPI_DOUBLE,
                  MPI_SUM, world_);
    t.copy_(host);
  }
  void forward_ghosts(torch::Tensor &t) override { pair_->exchange_ghost_rows(t, false); }
  void reverse_ghosts(torch::Tensor &t) override { pair_->exchange_ghost_rows(t, true); }

 private:
  PairEFA *pair_;
  MPI_Comm world_;
  bool skip_backward_sum_;
  bool inject_failure_;
};

std::string first_line(const std::string &text)
{
  auto end = text.find('\n');
  return end == std::string::npos ? text : text.substr(0, end);
}

// The error itself: TorchScript puts it on the last line, after the trace of the scripted code.
std::string last_line(const std::string &text)
{
  const auto end = text.find_last_not_of(" \n");
  if (end == std::string::npos) return text;
  const auto newline = text.find_last_of('\n', end);
  const auto start = newline == std::string::npos ? 0 : newline + 1;
  return text.substr(start, end + 1 - start);
}

// Test-only switches, read from the environment so that no input deck can set them.
bool env_flag(const char *name)
{
  const char *value = std::getenv(name);
  return value != nullptr && std::strcmp(value, "1") == 0;
}

int env_int(const char *name, int fallback)
{
  const char *value = std::getenv(name);
  return value != nullptr ? std::atoi(value) : fallback;
}

}  // namespace

PairEFA::PairEFA(LAMMPS *lmp) :
    Pair(lmp), device_(torch::kCPU), extent_policy_(ExtentPolicy::Default),
    extent_warned_(false), grid_fixed_(0), grid_in_use_(0), skip_backward_sum_(false),
    charge_(std::numeric_limits<double>::quiet_NaN()), spin_(std::numeric_limits<double>::quiet_NaN()),
    model_charge_(false), model_spin_(false), dtype_(torch::kFloat64), cutoff_(0.0),
    r_max_(0.0), model_periodic_(false), model_cell_(false), energy_unit_(1.0), sync_rows_(nullptr), sync_width_(0)
{
  single_enable = 0;
  restartinfo = 0;
  one_coeff = 1;
  manybody_flag = 1;
  centroidstressflag = CENTROID_NOTAVAIL;
  // negative control of tests/test_lammps.py: skips the backward reduction (wrong forces)
  skip_backward_sum_ = env_flag("EFA_UNSAFE_SKIP_BACKWARD_SUM");
  // tests/test_bad_inputs.py: a model evaluation error on this rank only
  fail_on_rank_ = env_int("EFA_TEST_FAIL_ON_RANK", -1);
  efa_malloc_policy("lean");  // peak memory near the live tensors (EFA_DEPLOY_MALLOC=keep: no page faults)
}

PairEFA::~PairEFA()
{
  if (allocated) {
    memory->destroy(setflag);
    memory->destroy(cutsq);
  }
}

void PairEFA::allocate()
{
  allocated = 1;
  const int n = atom->ntypes;
  memory->create(setflag, n + 1, n + 1, "pair:setflag");
  memory->create(cutsq, n + 1, n + 1, "pair:cutsq");
  for (int i = 1; i <= n; i++)
    for (int j = i; j <= n; j++) setflag[i][j] = 0;
  type_to_species_.assign(n + 1, -1);
}

/* pair_style efa [device cpu|cuda] [grid auto|N] [extent warn|error|off] [charge Q] [spin M] */

void PairEFA::settings(int narg, char **arg)
{
  std::string device = "cpu";
  extent_policy_ = ExtentPolicy::Default;
  grid_fixed_ = 0;
  charge_ = spin_ = std::numeric_limits<double>::quiet_NaN();
  kspace_ = "auto";
  kspace_mesh_.clear();
  int iarg = 0;
  while (iarg < narg) {
    const std::string key = arg[iarg];
    if (iarg + 1 >= narg) error->all(FLERR, "pair_style efa: keyword '{}' needs a value", key);
    const std::string value = arg[iarg + 1];
    if (key == "device") {
      if (value != "cpu" && value != "cuda")
        error->all(FLERR, "pair_style efa: device must be 'cpu' or 'cuda', not '{}'", value);
      device = value;
    } else if (key == "extent") {
      if (value == "warn") extent_policy_ = ExtentPolicy::Warn;
      else if (value == "error") extent_policy_ = ExtentPolicy::Error;
      else if (value == "off") extent_policy_ = ExtentPolicy::Off;
      else error->all(FLERR, "pair_style efa: extent must be warn, error or off, not '{}'", value);
    } else if (key == "grid") {
      grid_fixed_ = value == "auto" ? 0 : utils::inumeric(FLERR, value, false, lmp);
      if (grid_fixed_ < 0)
        error->all(FLERR, "pair_style efa: grid must be 'auto' or a number of Lebedev points, not '{}'", value);
    } else if (key == "kspace") {
      if (value != "direct" && value != "mesh" && value != "auto")
        error->all(FLERR, "pair_style efa: kspace must be direct, mesh or auto, not '{}'", value);
      kspace_ = value;
    } else if (key == "charge") {
      charge_ = utils::numeric(FLERR, value, false, lmp);
      if (!std::isfinite(charge_))
        error->all(FLERR, "pair_style efa: charge must be a finite number of e, not '{}'", value);
    } else if (key == "spin") {
      spin_ = utils::numeric(FLERR, value, false, lmp);
      if (!(std::isfinite(spin_) && spin_ >= 1.0 && spin_ == std::round(spin_)))
        error->all(FLERR, "pair_style efa: spin is the multiplicity 2S+1, a whole number >= 1, not '{}'", value);
    } else {
      error->all(FLERR, "pair_style efa: unknown keyword '{}' (known: device, grid, extent, kspace, charge, spin)", key);
    }
    iarg += 2;
  }
  select_device(device);
}

void PairEFA::select_device(const std::string &name)
{
  if (name == "cpu") {
    device_ = torch::Device(torch::kCPU);
    return;
  }
  if (!torch::cuda::is_available())
    error->all(FLERR,
               "pair_style efa device cuda: libtorch sees no CUDA GPU (CPU-only torch build, or no "
               "visible device); install the CUDA build of torch or use 'device cpu'");
  // ranks on one node share its GPUs round-robin by their rank within the node
  MPI_Comm node;
  MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, comm->me, MPI_INFO_NULL, &node);
  int local_rank = 0;
  MPI_Comm_rank(node, &local_rank);
  MPI_Comm_free(&node);
  const int ngpu = static_cast<int>(torch::cuda::device_count());
  device_ = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(local_rank % ngpu));
  utils::logmesg(lmp, "pair_style efa: rank {} uses cuda:{} ({} GPU(s) on its node)\n", comm->me,
                 local_rank % ngpu, ngpu);
}

/* pair_coeff * * model.pt El1 El2 ... (one element or NULL per atom type) */

void PairEFA::coeff(int narg, char **arg)
{
  if (!allocated) allocate();
  const int ntypes = atom->ntypes;
  if (narg != 3 + ntypes)
    error->all(FLERR,
               "pair_coeff for efa needs '* * model.pt' and one element (or NULL) per atom type: "
               "{} types, got {} elements",
               ntypes, narg - 3);
  if (strcmp(arg[0], "*") != 0 || strcmp(arg[1], "*") != 0)
    error->all(FLERR, "pair_coeff for efa must start with '* *' (one model for all types)");

  load_model(arg[2]);

  for (int t = 1; t <= ntypes; t++) {
    const std::string element = arg[2 + t];
    if (element == "NULL") {
      type_to_species_[t] = -1;
      continue;
    }
    int species = -1;
    for (size_t s = 0; s < model_elements_.size(); s++)
      if (model_elements_[s] == element) species = static_cast<int>(s);
    if (species < 0)
      error->all(FLERR, "pair_coeff: element '{}' (atom type {}) is not in model {}, which knows: {}",
                 element, t, model_path_, utils::join_words(model_elements_, " "));
    type_to_species_[t] = species;
  }
  int count = 0;
  for (int i = 1; i <= ntypes; i++)
    for (int j = i; j <= ntypes; j++) {
      setflag[i][j] = (type_to_species_[i] >= 0 && type_to_species_[j] >= 0) ? 1 : 0;
      count += setflag[i][j];
    }
  if (count == 0) error->all(FLERR, "pair_coeff for efa maps no atom type to an element");
}

void PairEFA::load_model(const std::string &path)
{
  model_path_ = path;
  if (!platform::file_is_readable(path))
    error->all(FLERR, "pair_style efa: model file {} does not exist or cannot be read", path);

  // one message for every way a file can fail, on every rank alike (all ranks read the same file)
  std::string problem;
  json meta;
  try {
    std::string text;
    const std::string crc = efa::read_model_zip(path, text);
    if (text.empty()) throw std::runtime_error(fmt::format("has no {}: it was not written by efa-export", METADATA_NAME));
    try {
      meta = json::parse(text);
    } catch (const std::exception &e) {
      throw std::runtime_error(fmt::format("{} is not valid JSON ({})", METADATA_NAME, first_line(e.what())));
    }
    problem = efa::check_metadata(meta);
    if (problem.empty() && meta.contains("network_crc32") && meta["network_crc32"] != crc)
      problem = "metadata field 'network_crc32' does not match the network: the file is corrupt; copy it again or "
                "export it again";
    if (problem.empty()) problem = efa::check_operators(meta);  // before torch::jit::load needs them
    if (problem.empty()) {
      model_ = std::make_unique<torch::jit::script::Module>(torch::jit::load(path, device_));
    }
  } catch (const c10::Error &e) {
    problem = fmt::format("is not a readable TorchScript model file ({}); re-export it with efa-export",
                          first_line(e.what_without_backtrace()));
  } catch (const std::exception &e) {
    problem = e.what();
  }
  if (!problem.empty()) {
    model_.reset();
    error->all(FLERR, "pair_style efa: {}{}{}", path, problem.rfind("metadata", 0) == 0 ? ": " : " ", problem);
  }

  model_elements_ = meta["elements"].get<std::vector<std::string>>();
  cutoff_ = meta["cutoff"].get<double>();
  dtype_ = meta["dtype"] == "float64" ? torch::kFloat64 : torch::kFloat32;
  model_periodic_ = meta["periodic"].get<bool>();
  const json inputs = meta.value("inputs", json::array());
  model_cell_ = std::find(inputs.begin(), inputs.end(), json("cell")) != inputs.end();
  r_max_ = meta["efa"]["enabled"].get<bool>() ? meta["efa"]["r_max"].get<double>() : 0.0;
  comm_forward = comm_reverse = meta["ghost_width"].get<int>();  // required by the schema
  const json global_inputs = meta.value("global_inputs", json::array());  // present with input charge_spin
  model_charge_ = std::find(global_inputs.begin(), global_inputs.end(), json("charge")) != global_inputs.end();
  model_spin_ = std::find(global_inputs.begin(), global_inputs.end(), json("spin")) != global_inputs.end();

  model_->eval();
  for (auto p : model_->parameters()) p.requires_grad_(false);
  grid_in_use_ = static_cast<int>(model_->run_method("grid_size").toInt());
  if (comm->me == 0)
    utils::logmesg(lmp, "pair_style efa: loaded {} (elements {}, cutoff {} A, {}{}, {})\n", path,
                   utils::join_words(model_elements_, " "), cutoff_,
                   r_max_ > 0 ? "EFA r_max " : "local only", r_max_ > 0 ? fmt::format("{} A", r_max_) : "",
                   meta["dtype"].get<std::string>());
  if (model_cell_ && comm->me == 0)
    utils::logmesg(lmp, "pair_style efa: periodic EFA, reciprocal-lattice vectors |k| < {} 1/A\n",
                   meta["efa"]["k_max"].get<double>());
  if (model_cell_ && !model_->find_method("set_kspace")) {
    if (kspace_ == "mesh")
      error->all(FLERR, "pair_style efa: model {} predates the k-space mesh; re-export it with this version's "
                        "efa-export (--from-model) or use 'kspace direct'", path);
    kspace_ = "direct";  // such a model always evaluates the direct sum
  }
  if (r_max_ > 0 && !model_cell_ && comm->me == 0) {
    const auto sizes = model_->run_method("grid_sizes").toIntVector();
    const double reach = model_->run_method("exact_extent", sizes.back()).toDouble();
    utils::logmesg(lmp, "pair_style efa: grid {}: {} Lebedev rules of {} to {} points carried, exact up to {:.1f} A\n",
                   grid_fixed_ ? std::to_string(grid_fixed_) : "auto", sizes.size(), sizes.front(), sizes.back(), reach);
  }
}

void PairEFA::check_units()
{
  const std::string units = update->unit_style;
  if (units == "metal") energy_unit_ = 1.0;
  else if (units == "real") energy_unit_ = KCAL_PER_MOL_PER_EV;
  else
    error->all(FLERR, "pair_style efa needs 'units metal' (native: eV, Angstrom) or 'units real', not '{}'",
               units);
}

// The rule of efa_deploy/checks.py (charge_spin_input): a model trained on an input needs it
// given; a model trained without it accepts only the neutral value (charge 0, multiplicity 1).
void PairEFA::check_global_inputs()
{
  const struct {
    const char *name, *trained_on, *give, *flag, *neutral;
    double value, neutral_value;
    bool taken;
  } inputs[] = {
      {"charge", "total charge", "the system's total charge in e", "charge_input", "0", charge_, 0.0, model_charge_},
      {"spin", "spin multiplicity", "the system's spin multiplicity 2S+1", "spin_input", "1", spin_, 1.0, model_spin_},
  };
  for (const auto &in : inputs) {
    const bool given = !std::isnan(in.value);
    if (in.taken && !given)
      error->all(FLERR, "pair_style efa: the model was trained on {}: give {} (pair_style efa ... {} {})", in.trained_on,
                 in.give, in.name, in.name == std::string("charge") ? "Q" : "M");
    if (!in.taken && given && in.value != in.neutral_value)
      error->all(FLERR,
                 "pair_style efa: the model was trained without {} (neutral, fixed-{} data) and cannot use a {}: got {} "
                 "{}; give {} {} or none, or use a model trained with {}: true",
                 in.trained_on, in.name, in.name, in.name, in.value, in.name, in.neutral, in.flag);
  }
  if ((model_charge_ || model_spin_) && comm->me == 0)
    utils::logmesg(lmp, "pair_style efa: total charge {} e, spin multiplicity {}\n", model_charge_ ? charge_ : 0.0,
                   model_spin_ ? spin_ : 1.0);
}

void PairEFA::init_style()
{
  if (!model_) error->all(FLERR, "pair_style efa: no model loaded; add 'pair_coeff * * model.pt El1 El2 ...'");
  if (force->newton_pair == 0)
    error->all(FLERR, "pair_style efa requires newton pair on (remove 'newton off' from the input)");
  check_units();
  check_global_inputs();
  // pair_style hybrid took the sub-styles' comm_forward/comm_reverse when pair_style was read,
  // before pair_coeff loaded the model and set this style's: raise the host's now, before
  // Comm::init sizes the communication buffers from them
  if (force->pair != this) {
    force->pair->comm_forward = std::max(force->pair->comm_forward, comm_forward);
    force->pair->comm_reverse = std::max(force->pair->comm_reverse, comm_reverse);
  }
  if (grid_fixed_ > 0 && r_max_ > 0) {
    const auto sizes = model_->run_method("grid_sizes").toIntVector();
    if (std::find(sizes.begin(), sizes.end(), grid_fixed_) == sizes.end()) {
      std::vector<std::string> names;
      for (auto n : sizes) names.push_back(std::to_string(n));
      error->all(FLERR, "pair_style efa: grid {}: model {} carries no {}-point rule; it carries {} (or use grid auto)",
                 grid_fixed_, model_path_, grid_fixed_, utils::join_words(names, " "));
    }
    grid_in_use_ = static_cast<int>(model_->run_method("set_grid_size", grid_fixed_).toInt());
  }
  if ((domain->xperiodic || domain->yperiodic || domain->zperiodic) && !model_periodic_)
    error->all(FLERR,
               "pair_style efa: model {} has a global EFA term in its finite form, which is not periodic; use "
               "'boundary f f f' or 'boundary s s s', or a model with periodic EFA (periodic_efa: true) or a local "
               "model (use_efa: false)",
               model_path_);
  if (model_cell_) {
    if (!(domain->xperiodic && domain->yperiodic && domain->zperiodic))
      error->all(FLERR,
                 "pair_style efa: model {} has periodic EFA, which needs 'boundary p p p' (mixed boundaries such as "
                 "'p p f' are not supported: pad a slab with vacuum in a fully periodic box, or use a model with "
                 "the finite form of EFA for finite systems)",
                 model_path_);
    no_virial_fdotr_compute = 1;  // the reciprocal term's virial is not sum r.f: strain derivative
  }
  neighbor->add_request(this, NeighConst::REQ_FULL);
}

double PairEFA::init_one(int, int) { return cutoff_; }

double PairEFA::check_coordinates_and_extent()
{
  // one reduction: bounding box minima, negated maxima, negated count of bad coordinates
  constexpr double inf = std::numeric_limits<double>::infinity();
  double box[7] = {inf, inf, inf, inf, inf, inf, 0.0};
  double **x = atom->x;
  const int *type = atom->type;
  for (int i = 0; i < atom->nlocal; i++) {
    if (type_to_species_[type[i]] < 0) continue;
    if (!std::isfinite(x[i][0]) || !std::isfinite(x[i][1]) || !std::isfinite(x[i][2])) {
      box[6] -= 1.0;
      continue;
    }
    for (int k = 0; k < 3; k++) {
      box[k] = std::min(box[k], x[i][k]);
      box[3 + k] = std::min(box[3 + k], -x[i][k]);
    }
  }
  MPI_Allreduce(MPI_IN_PLACE, box, 7, MPI_DOUBLE, MPI_MIN, world);
  if (box[6] < 0.0)
    error->all(FLERR,
               "pair_style efa: an atom has non-finite (NaN or inf) coordinates at step {}; the "
               "simulation blew up or the input structure is broken (try a smaller timestep)",
               update->ntimestep);
  if (r_max_ <= 0.0 || model_cell_ || !std::isfinite(box[0])) return 0.0;
  // the extent (graph.system_extent): twice the largest distance from the box centre, an upper
  // bound on every interatomic distance
  const double centre[3] = {0.5 * (box[0] - box[3]), 0.5 * (box[1] - box[4]), 0.5 * (box[2] - box[5])};
  double radius2 = 0.0;
  for (int i = 0; i < atom->nlocal; i++) {
    if (type_to_species_[type[i]] < 0) continue;
    const double dx = x[i][0] - centre[0], dy = x[i][1] - centre[1], dz = x[i][2] - centre[2];
    radius2 = std::max(radius2, dx * dx + dy * dy + dz * dz);
  }
  MPI_Allreduce(MPI_IN_PLACE, &radius2, 1, MPI_DOUBLE, MPI_MAX, world);
  return 2.0 * std::sqrt(radius2);
}

// Every rank holds the same extent and the same model state, so every rank installs the same
// grid; this runs before the model is evaluated, so a step never mixes grids.
void PairEFA::select_grid(double extent)
{
  if (r_max_ <= 0.0) return;
  if (!grid_fixed_) {
    const int n = static_cast<int>(model_->run_method("select_grid", extent).toInt());
    if (n != grid_in_use_ && comm->me == 0)
      utils::logmesg(lmp, "pair_style efa: grid {} -> {} points, extent {:.1f} A\n", grid_in_use_, n, extent);
    grid_in_use_ = n;
  }
  const ExtentPolicy policy =
      extent_policy_ != ExtentPolicy::Default ? extent_policy_ : grid_fixed_ ? ExtentPolicy::Warn : ExtentPolicy::Error;
  const double reach = model_->run_method("exact_extent", grid_in_use_).toDouble();
  if (policy == ExtentPolicy::Off || extent <= reach) return;
  const std::string what = grid_fixed_
      ? fmt::format("the exact range of the fixed {}-point grid, {:.2f} A", grid_in_use_, reach)
      : fmt::format("{:.2f} A, the largest extent the model's largest grid ({} points) keeps exact", reach, grid_in_use_);
  const std::string fix = grid_fixed_ ? "use 'grid auto'" : "use a model with a smaller omega_max (b_max / r_max)";
  if (policy == ExtentPolicy::Error)
    error->all(FLERR, "pair_style efa: the system extends {:.2f} A at step {}, beyond {}; {} ('extent warn' goes on)",
               extent, update->ntimestep, what, fix);
  if (!extent_warned_ && comm->me == 0)
    error->warning(FLERR,
                   "pair_style efa: the system extends {:.2f} A, beyond {}: the global term loses accuracy and "
                   "rotation invariance; {} ('extent error' makes this an error)",
                   extent, what, fix);
  extent_warned_ = true;
}

void PairEFA::compute(int eflag, int vflag)
{
  ev_init(eflag, vflag);
  if (vflag_atom)
    error->all(FLERR, "pair_style efa does not compute per-atom virials (compute stress/atom); the global "
                      "virial and pressure are available");
  const double extent = check_coordinates_and_extent();
  if (model_cell_) check_periodic_cell();
  else select_grid(extent);

  const int nlocal = atom->nlocal;
  const int ntotal = nlocal + atom->nghost;
  double **x = atom->x;
  double **f = atom->f;
  const int *type = atom->type;

  std::vector<int64_t> species(ntotal);
  std::vector<double> owned(ntotal, 0.0);
  for (int i = 0; i < ntotal; i++) {
    const int s = type_to_species_[type[i]];
    species[i] = s < 0 ? 0 : s;
    owned[i] = (i < nlocal && s >= 0) ? 1.0 : 0.0;
  }

  std::vector<int64_t> &edges = edge_pairs_;
  edges.clear();
  const double *xs = x[0];  // atom->x is one contiguous N x 3 block
  const double cut2 = cutoff_ * cutoff_;
  double closest_r2 = std::numeric_limits<double>::infinity();  // the closest pair, named if results are not finite
  int closest_i = -1, closest_j = -1;
  for (int ii = 0; ii < list->inum; ii++) {
    const int i = list->ilist[ii];
    if (type_to_species_[type[i]] < 0) continue;
    const int *jlist = list->firstneigh[i];
    const double *xi = xs + 3 * i;
    for (int jj = 0; jj < list->numneigh[i]; jj++) {
      const int j = jlist[jj] & NEIGHMASK;
      const double *xj = xs + 3 * j;
      const double dx = xj[0] - xi[0], dy = xj[1] - xi[1], dz = xj[2] - xi[2];
      const double r2 = dx * dx + dy * dy + dz * dz;
      if (r2 < cut2 && type_to_species_[type[j]] >= 0) {
        edges.push_back(j);
        edges.push_back(i);
        if (r2 < closest_r2) {
          closest_r2 = r2;
          closest_i = i;
          closest_j = j;
        }
      }
    }
  }
  const int64_t nedges = static_cast<int64_t>(edges.size() / 2);

  const auto cpu_long = torch::TensorOptions().dtype(torch::kInt64);
  const auto cpu_double = torch::TensorOptions().dtype(torch::kFloat64);
  const auto on_device = torch::TensorOptions().dtype(dtype_).device(device_);

  LammpsComm backend(this, world, skip_backward_sum_, comm->me == fail_on_rank_);
  efa::BackendGuard guard(&backend);
  // TorchScript's optimising executor re-specialises the graph on the first calls; the plain
  // executor gives the same numbers as Python from the first step (for this style's calls only)
  torch::jit::GraphOptimizerEnabledGuard plain_executor(false);
  torch::Tensor forces, atomic;
  double strain_virial[6] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
  try {
    torch::Tensor positions = ntotal > 0 ? torch::from_blob(x[0], {ntotal, 3}, cpu_double).to(on_device, false, true)
                                         : torch::zeros({0, 3}, on_device);
    positions.requires_grad_(true);
    // periodic EFA: positions and cell deform together by (I + sym(strain)); -dE/dstrain is the
    // virial (efa_deploy.model.energy_forces_stress)
    torch::Tensor strain, model_positions = positions, cell;
    if (model_cell_) {
      const double *h = domain->h;  // xprd yprd zprd yz xz xy
      const double rows[9] = {h[0], 0.0, 0.0, h[5], h[1], 0.0, h[4], h[3], h[2]};
      cell = torch::from_blob(const_cast<double *>(rows), {1, 3, 3}, cpu_double).to(on_device).clone();
      if (vflag_global) {
        strain = torch::zeros({3, 3}, on_device).requires_grad_(true);
        const torch::Tensor deform = torch::eye(3, on_device) + 0.5 * (strain + strain.t());
        model_positions = positions.matmul(deform);
        cell = cell.matmul(deform);
      }
    }
    torch::Tensor species_t = torch::from_blob(species.data(), {ntotal}, cpu_long).to(device_, false, true);
    torch::Tensor edge_index = torch::from_blob(edges.data(), {nedges, 2}, cpu_long).t().to(device_);
    torch::Tensor edge_shift = torch::zeros({nedges, 3}, on_device);
    torch::Tensor batch = torch::zeros({ntotal}, torch::TensorOptions().dtype(torch::kInt64).device(device_));
    torch::Tensor owned_t = torch::from_blob(owned.data(), {ntotal}, cpu_double).to(on_device, false, true);

    std::vector<torch::jit::IValue> inputs{model_positions, species_t, edge_index, edge_shift, batch,
                                           static_cast<int64_t>(1), owned_t};
    if (model_charge_ || model_spin_) {  // the eighth input, charge_spin (1, 2); unused columns neutral
      const double charge_spin[2] = {model_charge_ ? charge_ : 0.0, model_spin_ ? spin_ : 1.0};
      inputs.emplace_back(torch::tensor({charge_spin[0], charge_spin[1]}, cpu_double).reshape({1, 2}).to(on_device));
    }
    if (model_cell_) {
      select_kspace(cell.detach());
      inputs.emplace_back(cell);
    }
    atomic = model_->forward(inputs).toTensor();
    backend.in_backward = true;
    std::vector<torch::Tensor> wrt{positions};
    if (strain.defined()) wrt.push_back(strain);
    auto grads = torch::autograd::grad({atomic.sum()}, wrt, {}, false, false, true);
    forces = grads[0].defined() ? grads[0].neg() : torch::zeros_like(positions);
    if (strain.defined()) {
      const torch::Tensor w = grads[1].defined() ? grads[1].to(torch::kCPU, torch::kFloat64).contiguous()
                                                 : torch::zeros({3, 3}, cpu_double);
      const double *dw = w.data_ptr<double>();  // dE/dstrain, row-major
      const int pairs[6][2] = {{0, 0}, {1, 1}, {2, 2}, {0, 1}, {0, 2}, {1, 2}};  // LAMMPS order
      for (int k = 0; k < 6; k++)
        strain_virial[k] = -energy_unit_ * 0.5 * (dw[3 * pairs[k][0] + pairs[k][1]] + dw[3 * pairs[k][1] + pairs[k][0]]);
    }
    forces = forces.to(torch::kCPU, torch::kFloat64).contiguous();
    atomic = atomic.detach().to(torch::kCPU, torch::kFloat64).contiguous();
  } catch (const c10::Error &e) {
    evaluation_failed(last_line(e.what_without_backtrace()));
  } catch (const std::exception &e) {
    evaluation_failed(last_line(e.what()));
  }

  const double *fr = forces.data_ptr<double>();
  const double *er = atomic.data_ptr<double>();
  check_finite_results(er, fr, closest_r2, closest_i, closest_j);
  for (int i = 0; i < ntotal; i++)
    for (int k = 0; k < 3; k++) f[i][k] += energy_unit_ * fr[3 * i + k];

  if (eflag_global)
    for (int i = 0; i < nlocal; i++) eng_vdwl += energy_unit_ * er[i];
  if (eflag_atom)
    for (int i = 0; i < nlocal; i++) eatom[i] += energy_unit_ * er[i];
  if (vflag_fdotr) virial_fdotr_compute();
  if (model_cell_ && vflag_global)
    for (int k = 0; k < 6; k++) virial[k] += strain_virial[k];
}

// What periodic EFA needs of the box at every step (it may change under fix npt/deform): a
// volume, and at least one cutoff of perpendicular width in each direction (the rule of
// efa_deploy.graph.check_periodic_cell). Every rank holds the same box: the error is collective.
void PairEFA::check_periodic_cell()
{
  const double *h = domain->h;  // xprd yprd zprd yz xz xy
  const double volume = h[0] * h[1] * h[2];
  if (!(std::isfinite(volume) && volume > 0.0))
    error->all(FLERR, "pair_style efa: the periodic box is degenerate (volume {}) at step {}", volume,
               update->ntimestep);
  // perpendicular widths of the LAMMPS cell a = (xprd, 0, 0), b = (xy, yprd, 0), c = (xz, yz, zprd)
  const double wx = volume / std::sqrt(h[1] * h[1] * h[2] * h[2] + h[5] * h[5] * h[2] * h[2] +
                                       (h[5] * h[3] - h[1] * h[4]) * (h[5] * h[3] - h[1] * h[4]));
  const double wy = volume / std::sqrt(h[0] * h[0] * h[2] * h[2] + h[0] * h[0] * h[3] * h[3]);
  const double wz = h[2];
  const double width = std::min({wx, wy, wz});
  if (width < cutoff_)
    error->all(FLERR,
               "pair_style efa: the periodic box is {:.3f} A wide (perpendicular width) at step {}, less than the "
               "model's cutoff of {} A: replicate it ('replicate 2 2 2'); the periodic model gives the same energy "
               "per atom in any supercell",
               width, update->ntimestep, cutoff_);
}

// Every rank holds the same cell, so every rank installs the same mesh (or the direct sum); the
// model keeps a mesh while it carries every k-vector of the cell, so the energy stays continuous
// under NPT (the model's set_kspace). 'auto' is resolved at the first step and then kept.
void PairEFA::select_kspace(const torch::Tensor &cell)
{
  if (kspace_ == "direct") return;  // the model starts on the direct sum; 'auto' resolved to it stays there
  const auto sizes = model_->run_method("set_kspace", kspace_, cell).toIntVector();
  if (kspace_ == "auto") kspace_ = sizes.empty() ? "direct" : "mesh";
  if (sizes != kspace_mesh_ && comm->me == 0) {
    if (sizes.empty())
      utils::logmesg(lmp, "pair_style efa: k-space: direct sum over the reciprocal-lattice vectors\n");
    else
      utils::logmesg(lmp, "pair_style efa: k-space: mesh {}x{}x{} (order 6) at step {}\n", sizes[0], sizes[1],
                     sizes[2], update->ntimestep);
  }
  kspace_mesh_ = sizes;
}

void PairEFA::evaluation_failed(const std::string &reason)
{
  const std::string message = fmt::format("pair_style efa: model evaluation failed on rank {} at step {}: {}",
                                          comm->me, update->ntimestep, reason);
  if (comm->nprocs == 1) error->one(FLERR, message);
  // The other ranks may wait inside a collective of the model that this rank will never join,
  // and in library mode LAMMPS hands error->one to the host (an MPIAbortException in Python),
  // which need not abort: no recovery is possible, so abort here, after the message is out.
  const std::string line = fmt::format("ERROR on proc {}: {}\n", comm->me, message);
  std::fputs(line.c_str(), stderr);
  std::fflush(stderr);
  if (logfile) {
    std::fputs(line.c_str(), logfile);
    std::fflush(logfile);
  }
  // mpiexec forwards a rank's stderr asynchronously: give it time before the abort tears it down
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  MPI_Abort(world, 1);
  std::exit(1);  // MPI_Abort does not return
}

void PairEFA::check_finite_results(const double *energies, const double *forces, double closest_r2, int closest_i,
                                   int closest_j)
{
  // every rank contributes: how many of its atoms have non-finite results, the first three of
  // their IDs, and its closest pair (distance and IDs); one gather, so every rank raises the same error
  constexpr int WIDTH = 7, NAMED = 3;
  std::vector<double> mine(WIDTH, 0.0);
  mine[4] = std::sqrt(closest_r2);
  if (closest_i >= 0) {
    mine[5] = atom->tag[closest_i];
    mine[6] = atom->tag[closest_j];
  }
  const int nlocal = atom->nlocal, ntotal = nlocal + atom->nghost;
  for (int i = 0; i < ntotal; i++) {
    const bool bad = (i < nlocal && !std::isfinite(energies[i])) || !std::isfinite(forces[3 * i]) ||
        !std::isfinite(forces[3 * i + 1]) || !std::isfinite(forces[3 * i + 2]);
    if (!bad) continue;
    if (mine[0] < NAMED) mine[1 + static_cast<int>(mine[0])] = atom->tag[i];
    mine[0] += 1.0;
  }
  std::vector<double> all(WIDTH * comm->nprocs);
  MPI_Allgather(mine.data(), WIDTH, MPI_DOUBLE, all.data(), WIDTH, MPI_DOUBLE, world);
  double count = 0.0, closest = std::numeric_limits<double>::infinity();
  std::vector<long long> named;
  long long pair_a = 0, pair_b = 0;
  for (int r = 0; r < comm->nprocs; r++) {
    const double *row = &all[WIDTH * r];
    count += row[0];
    for (int k = 0; k < std::min<int>(NAMED, static_cast<int>(row[0])); k++) named.push_back(static_cast<long long>(row[1 + k]));
    if (row[5] > 0 && row[4] < closest) {
      closest = row[4];
      pair_a = static_cast<long long>(std::min(row[5], row[6]));
      pair_b = static_cast<long long>(std::max(row[5], row[6]));
    }
  }
  if (count == 0.0) return;
  std::sort(named.begin(), named.end());
  named.erase(std::unique(named.begin(), named.end()), named.end());
  std::string ids;
  for (const long long id : named) ids += (ids.empty() ? "" : " ") + std::to_string(id);
  const std::string pair = closest < CLOSE_CONTACT
      ? fmt::format("; atoms {} and {} are {:.3g} A apart", pair_a, pair_b, closest)
      : "";
  error->all(FLERR,
             "pair_style efa: the model gave NaN or inf energies or forces at step {} (atom IDs {}){}; check the "
             "structure (overlapping atoms, a blown-up run) and the model file",
             update->ntimestep, ids, pair);
}

void PairEFA::exchange_ghost_rows(torch::Tensor &rows, bool reverse)
{
  const int nlocal = atom->nlocal;
  const int ntotal = nlocal + atom->nghost;
  if (rows.dim() != 2 || rows.size(0) != ntotal || rows.size(1) > comm_forward)
    error->one(FLERR, "pair_style efa: ghost exchange of a {} tensor; expected {} rows of at most {} values",
               c10::str(rows.sizes()), ntotal, comm_forward);
  sync_rows_ = &rows;
  sync_width_ = static_cast<int>(rows.size(1));
  if (reverse) {
    comm->reverse_comm(this, sync_width_);
    rows.narrow(0, nlocal, ntotal - nlocal).zero_();
  } else {
    comm->forward_comm(this, sync_width_);
  }
  sync_rows_ = nullptr;
}

// A swap's list of atom indices, on the rows' device.
torch::Tensor PairEFA::swap_rows(int n, const int *list) const
{
  return torch::from_blob(const_cast<int *>(list), {n}, torch::kInt32).to(sync_rows_->device(), torch::kInt64);
}

// LAMMPS's communication buffer seen as n rows of the exchange.
torch::Tensor PairEFA::host_buffer(double *buf, int n) const
{
  return torch::from_blob(buf, {n, sync_width_}, torch::TensorOptions().dtype(torch::kFloat64));
}

int PairEFA::pack_forward_comm(int n, int *list, double *buf, int, int *)
{
  if (n > 0) host_buffer(buf, n).copy_(sync_rows_->index_select(0, swap_rows(n, list)));
  return n * sync_width_;
}

void PairEFA::unpack_forward_comm(int n, int first, double *buf)
{
  if (n > 0) sync_rows_->narrow(0, first, n).copy_(host_buffer(buf, n));
}

int PairEFA::pack_reverse_comm(int n, int first, double *buf)
{
  if (n > 0) host_buffer(buf, n).copy_(sync_rows_->narrow(0, first, n));
  return n * sync_width_;
}

void PairEFA::unpack_reverse_comm(int n, int *list, double *buf)
{
  if (n > 0)
    sync_rows_->index_add_(0, swap_rows(n, list),
                           host_buffer(buf, n).to(sync_rows_->device(), sync_rows_->scalar_type()));
}

// The creator that efa_plugin.cpp (the loader LAMMPS registers) looks up in this library.
extern "C" void *efa_create_pair(void *lmp) { return new PairEFA(static_cast<LAMMPS *>(lmp)); }
