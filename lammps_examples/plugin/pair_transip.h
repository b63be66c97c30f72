/* -*- c++ -*- ----------------------------------------------------------
   pair_style transip: a TransIP machine-learned potential (one exported
   TorchScript file) evaluated through libtorch inside LAMMPS.

   Part of transip-md, loaded into LAMMPS as a plugin (transipplugin.so).

   Usage:
     plugin     load /path/to/transipplugin.so
     units      metal                               (or real: kcal/mol, converted
                                                     at the plugin boundary)
     newton     on                                  (the default)
     pair_style transip [device cpu|cuda] [charge Q] [multiplicity M]
                        [ghosts auto|map|halo|shell] [prune yes|no]
                        [recompute yes|no] [jit_optimize yes|no]
                        [check_masses yes|no] [edges auto|host|device]
     pair_coeff * * model.pt O H                    (one element symbol per
                                                     atom type, NULL = skip)

   Source files:
     pair_transip.cpp        the pair-style methods (settings, coeff, init_style,
                             init_one, compute) and the checks of the input
     pair_transip_rows.cpp   the model's input rows and edges (one builder for
                             every ghost mode) and the one scatter of its results
     pair_transip_halo.cpp   the per-layer halo exchange (ghosts halo)
     pair_transip_device_edges.cpp  ghosts map: the model's edges selected on its
                             device from LAMMPS' list (edges device)
     pair_transip_timing.h/.cpp  the time per step of compute()'s phases, reported
                             after each run (finish)
     transip_model.h/.cpp    the door to the model file, shared with
                             export/check/transip_check (namespace transip)
------------------------------------------------------------------------- */

#ifndef LMP_PAIR_TRANSIP_H
#define LMP_PAIR_TRANSIP_H

#include "pair.h"

#include "pair_transip_timing.h"
#include "transip_model.h"

#include <torch/script.h>

#include <memory>
#include <string>
#include <vector>

namespace LAMMPS_NS {

class PairTransIP : public Pair {
 public:
  PairTransIP(class LAMMPS *);
  ~PairTransIP() override;

  void compute(int, int) override;
  void settings(int, char **) override;
  void coeff(int, char **) override;
  void init_style() override;
  double init_one(int, int) override;
  double memory_usage() override;
  void finish() override;    // the per-step time of compute()'s phases (pair_transip_timing.cpp)

  // halo mode: features (forward) and their gradients (reverse) of W doubles per atom
  int pack_forward_comm(int, int *, double *, int, int *) override;
  void unpack_forward_comm(int, int, double *) override;
  int pack_reverse_comm(int, int, double *) override;
  void unpack_reverse_comm(int, int *, double *) override;

  enum GhostMode { GHOSTS_SHELL, GHOSTS_MAP, GHOSTS_HALO };

 protected:
  // ---- pair_style settings
  std::string device_request;    // "cpu" or "cuda"
  int64_t total_charge;          // system's total charge (e)
  int64_t multiplicity;          // system's spin multiplicity 2S+1
  bool prune;                    // hand the model only atoms/edges that reach owned atoms
  int jit_optimize;              // TorchScript graph optimisation: 1 on, 0 off, -1 auto
  bool recompute;                // halo: keep one layer's autograd graph at a time
  std::string ghost_request;     // "auto", "map", "halo" or "shell"
  GhostMode ghost_mode;          // this run's mode (decided in init_style)
  int64_t feature_width;         // W, features per atom exchanged between layers
  double cutghost_before;        // comm->cutghostuser before shell mode raised it
  double cutghost_raised;        // the value shell mode set (0: none)
  bool check_masses;             // warn when a type's mass is not its element's
  std::string edges_request;     // "auto", "host" or "device"
  bool device_edges;             // this run: edges selected on the model's device (map mode)

  // ---- units: the model works in eV and Å; LAMMPS energies are eV (metal) or kcal/mol (real).
  // Energies, forces and the virial are multiplied by energy_unit on the way out, nothing else.
  double energy_unit;            // LAMMPS energy unit per eV (1 for metal)
  double kcal_per_mol_per_ev;    // from the model file's declaration (0: not there)
  std::string kcal_source;       // where in the file it came from

  // ---- model (valid after pair_coeff), read through the door (transip_model.h)
  std::unique_ptr<transip::Model> model;
  std::string model_path;
  torch::Device device;
  torch::Dtype model_dtype;
  double model_cutoff;             // Å
  double receptive_field;          // Å, cutoff x layers
  int64_t num_layers;
  int64_t format_version;
  std::vector<std::string> model_elements;
  bool electron_warning_given;     // the "predates the electron-count check" warning
  std::vector<std::string> mass_warnings_given;    // each one once

  // ---- type map: LAMMPS type (1..ntypes) -> atomic number, 0 for NULL
  std::vector<int64_t> type_to_z;
  std::vector<std::string> type_symbol;

  // ---- the model's input, rebuilt every step by build_rows() (pair_transip_rows.cpp)
  std::vector<int> atom_to_row;        // LAMMPS index -> model row (-1: not a row)
  std::vector<int> row_to_atom;        // model row -> LAMMPS index
  int64_t nlocal_rows;                 // rows of owned atoms (ghost rows follow them)
  std::vector<double> pos_buf;         // [rows, 3]
  std::vector<int64_t> z_buf;          // [rows]
  std::vector<int64_t> edge_i_buf, edge_j_buf;
  std::vector<double> shift_buf;       // [edges, 3] image - owner (map mode)
  std::vector<int> tag_to_local;       // atom ID -> owned index (map mode)
  tagint max_owned_tag;                // largest owned atom ID (size of tag_to_local - 1)
  torch::Tensor stage_int, stage_real; // CUDA: pinned host blocks the buffers above travel in
  std::vector<int> hops;               // graph distance (in edges) from owned atoms (shell)
  std::vector<int> frontier, next_frontier;
  std::vector<char> centre_in_list;    // atom has a neighbour row in the list
  bool report_load;                    // log ghost/local counts at the next compute
  transip::PhaseTimes phase_times;     // where compute() spends its time (pair_transip_timing.h)

  // ---- edges device (pair_transip_device_edges.cpp): LAMMPS' pairs of mapped atoms, uploaded
  // once per neighbour-list build; each step only the positions travel and the device keeps
  // the pairs within the model cutoff
  torch::Tensor cand_ri, cand_rj, cand_j;    // int32 [candidates]: centre row, owner row of
                                             //   the neighbour, neighbour's LAMMPS index
  torch::Tensor row_atom_dev;                // int64 [rows]: LAMMPS index of each row
  torch::Tensor numbers_dev, charge_dev, spin_dev;
  torch::Tensor stage_x;                     // CUDA: pinned host block for atom->x
  bigint cand_ncalls;                        // neighbor->ncalls the candidates belong to
  int cand_nlocal, cand_nghost;              // atom counts then
  int64_t ncandidates;

  // ---- halo exchange (pair_transip_halo.cpp): only the rows LAMMPS communicates cross
  // between the model's device and the host; host blocks are pinned when the device is CUDA,
  // hold the model's dtype (float64, else float32) and are kept between steps
  torch::Dtype halo_dtype;             // dtype of the feature blocks on the host
  torch::Tensor halo_out;              // the owned rows being sent (model device), while sending
  torch::Tensor halo_all_local;        // host copy of all of halo_out, made only when needed
  torch::Tensor border_feat;           // host [border rows, W]: owned rows LAMMPS sends
  torch::Tensor ghost_feat;            // host [nghost, W]: ghosts' features, model ghost rows
                                       //   first; backward: those rows' gradients
  torch::Tensor border_grad;           // host float64 [border atoms, W]: gradients received
  torch::Tensor border_index;          // model rows of the owned border atoms, on the device
  std::vector<int> border_atoms;       // atoms LAMMPS sends (owned or ghost), in slot order
  std::vector<int> border_new;         // atoms first sent in the current exchange
  std::vector<int> border_slot;        // LAMMPS index -> slot in border_atoms (-1 none, -2 new)
  std::vector<int64_t> border_rows;    // model rows of the owned border atoms (slots 0..)
  std::vector<int> ghost_slot;         // LAMMPS index - nlocal -> row of ghost_feat
  bigint border_ncalls;                // neighbor->ncalls when border_atoms was started
  int border_nlocal, border_nghost;    // atom counts then

  // pair_transip.cpp
  void allocate();
  void select_device();
  void load_model(const std::string &path);
  void all_agree_or_fail(const std::string &local_error);
  bool has_halo_entries() const;
  bool can_prune() const;
  void check_units_style(const char *where);
  void set_energy_unit();
  void check_box();
  void check_type_masses();
  void check_electron_count();
  void evaluate_model();
  std::string atom_ids_of_rows(const std::vector<int64_t> &rows) const;
  [[noreturn]] void model_failed(const transip::ModelMessage &why);

  // pair_transip_rows.cpp
  void build_rows();
  void index_owned_tags();
  int owner_of(int j) const;
  void mark_reachable();
  void report_model_load(int64_t nedges);
  struct ModelInputs {
    torch::Tensor pos, numbers, edge_i, edge_j, shift, charge, spin;    // shift: map mode
  };
  ModelInputs model_inputs();
  void add_model_results(const double *fr, const double *er, const double *model_virial);

  // pair_transip_device_edges.cpp
  void prepare_device_edges();
  void build_candidates();
  ModelInputs device_edge_inputs();

  // pair_transip_halo.cpp
  void compute_halo();
  torch::Tensor host_rows(torch::Tensor &block, int64_t rows, int64_t width, torch::Dtype dtype);
  void index_border_atoms();
  void gather_border_rows();
  const torch::Tensor &all_local_rows();
  void send_features(const torch::Tensor &out_l);
  torch::Tensor ghost_rows_to_device();
  torch::Tensor return_ghost_gradients(const torch::Tensor &g_h);
  [[noreturn]] void exchange_failed(const std::exception &e);
};

}    // namespace LAMMPS_NS

#endif
