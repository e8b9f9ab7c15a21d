// pair_style efa: Euclidean fast attention force fields exported by efa-export.
//
// The model is one TorchScript file. Its local message passing needs one cutoff of ghost
// atoms, whose features are refreshed after every layer by LAMMPS forward communication;
// its global EFA sums are summed over `world`. Both happen inside the model through the
// torch.ops.efa collectives (efa_ops.h), which this pair style backs with LAMMPS and MPI
// while compute() runs.
#ifdef PAIR_CLASS
// clang-format off
PairStyle(efa,PairEFA);
// clang-format on
#else

#ifndef LMP_PAIR_EFA_H
#define LMP_PAIR_EFA_H

#include "pair.h"

#include <torch/script.h>

#include <memory>
#include <string>
#include <vector>

namespace LAMMPS_NS {

class PairEFA : public Pair {
 public:
  PairEFA(class LAMMPS *);
  ~PairEFA() override;
  void compute(int, int) override;
  void settings(int, char **) override;
  void coeff(int, char **) override;
  void init_style() override;
  double init_one(int, int) override;
  int pack_forward_comm(int, int *, double *, int, int *) override;
  void unpack_forward_comm(int, int, double *) override;
  int pack_reverse_comm(int, int, double *) override;
  void unpack_reverse_comm(int, int *, double *) override;

  // used by the communication backend
  void exchange_ghost_rows(torch::Tensor &rows, bool reverse);

 private:
  enum class ExtentPolicy { Default, Warn, Error, Off };  // Default: Error with grid auto, else Warn

  torch::Device device_;
  ExtentPolicy extent_policy_;
  bool extent_warned_;
  int grid_fixed_;   // 0: grid auto (the model chooses its Lebedev rule from the extent)
  int grid_in_use_;  // points of the rule the model uses now
  bool skip_backward_sum_;  // testing only: the wrong forces the reverse reduction prevents
  int fail_on_rank_;        // testing only: this rank's model evaluation fails
  // global inputs: `charge Q spin M` as given (NaN: not given), and which ones the model takes
  double charge_, spin_;
  bool model_charge_, model_spin_;

  std::string model_path_;
  std::unique_ptr<torch::jit::script::Module> model_;
  torch::Dtype dtype_;
  double cutoff_;
  double r_max_;  // 0 when the model has no EFA
  bool model_periodic_;
  bool model_cell_;  // periodic EFA: the model takes the cell; virial by the strain derivative
  std::string kspace_;              // periodic EFA: direct, mesh or auto (resolved at the first step)
  std::vector<int64_t> kspace_mesh_;  // the mesh in use (empty: the direct sum over k)
  std::vector<std::string> model_elements_;
  std::vector<int> type_to_species_;  // per LAMMPS type; -1 for NULL
  double energy_unit_;                // eV -> LAMMPS energy unit

  // this step's edges, sender (neighbour j) then receiver (owned i), interleaved; kept across
  // steps so that building them reuses the memory (a fresh vector cost twice the time)
  std::vector<int64_t> edge_pairs_;

  // the rows being communicated, N x sync_width_, on the model's device and in its dtype: each
  // swap stages only the rows it sends or receives through LAMMPS's host buffers
  torch::Tensor *sync_rows_;
  int sync_width_;
  torch::Tensor swap_rows(int n, const int *list) const;
  torch::Tensor host_buffer(double *buf, int n) const;

  void allocate();
  void load_model(const std::string &path);
  void check_units();
  void check_global_inputs();
  double check_coordinates_and_extent();
  void check_periodic_cell();
  void select_kspace(const torch::Tensor &cell);
  void select_grid(double extent);
  [[noreturn]] void evaluation_failed(const std::string &reason);
  void check_finite_results(const double *energies, const double *forces, double closest_r2, int closest_i,
                            int closest_j);
  void select_device(const std::string &name);
};

}  // namespace LAMMPS_NS

#endif
#endif
