/* ----------------------------------------------------------------------
   pair_style transip: see pair_transip.h and lammps_examples/README.md.

   Data flow per step (compute):
     owned + ghost atoms of mapped types  -> positions [rows, 3], Z [rows]
     full neighbour list (ghosts too)     -> directed edges (row_i, row_j)
     (build_rows, pair_transip_rows.cpp: one builder for every ghost mode)
     the model                            -> local energies, forces on all rows
     add_model_results                    -> atom->f, eng_vdwl, eatom, virial
   Forces on ghosts go into atom->f; LAMMPS' reverse communication (newton pair on) hands
   them to their owners; the virial is sum_i x_i . f_i (virial_fdotr_compute).

   Ghost modes, all exact:
     map    one rank: periodic ghosts mapped to the owned atoms they image, the model's
            mapped_energies_forces_virial on owned atoms only (ghosts to cutoff + skin)
     halo   any ranks: ghosts to cutoff + skin, the network run layer by layer with the
            features of boundary atoms exchanged between layers (pair_transip_halo.cpp)
     shell  any ranks: ghosts to receptive field (layers x cutoff) + skin, the model's
            local_energies_forces on the whole shell (pruned to what reaches owned atoms)

   The model file is read through the door shared with export/check (transip_model.h): format
   version, declaration (or the probe of older files), entry-point names, capabilities, unit
   factors, and the translation of the model's errors (rows -> atom IDs here).
------------------------------------------------------------------------- */

#include "pair_transip.h"

#include "atom.h"
#include "comm.h"
#include "domain.h"
#include "error.h"
#include "force.h"
#include "memory.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "update.h"
#include "utils.h"

#include <torch/cuda.h>
#include <torch/csrc/jit/runtime/graph_executor.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mpi.h>
#include <sstream>

using namespace LAMMPS_NS;

namespace {

// How messages of the model door name this reader.
const transip::Reader READER{"pair_style transip", "this plugin",
                             "python -m transip_md.lammps build"};

// The halo entry points (export/CONTRACT.md 4.6).
const char *const HALO_ENTRIES[] = {"halo_feature_width", "halo_edges", "halo_embed",
                                    "halo_layer", "halo_readout"};

// A type's mass further than this (relative) from its element's standard mass is warned about.
constexpr double MASS_TOLERANCE = 0.1;

// Why a per-type mass may differ from element z's: it is another element's standard mass
// (types mapped in the wrong order), or within a few mass units of it (an isotope such as
// deuterium 2.014 for H). "" if neither.
std::string mass_mismatch_hint(double mass, int z)
{
  for (int other = 1; other <= transip::kMaxAtomicNumber; ++other) {
    const double standard = transip::standard_mass(other);
    if (other != z && std::fabs(mass - standard) <= 0.005 * standard)
      return fmt::format(", the standard mass of {}", transip::element_symbol(other));
  }
  if (std::fabs(mass - transip::standard_mass(z)) <= 3.5)
    return fmt::format(", which may be an isotope of {}", transip::element_symbol(z));
  return "";
}

std::string join(const std::vector<std::string> &items, const char *sep)
{
  std::string out;
  for (size_t k = 0; k < items.size(); ++k) out += (k ? sep : "") + items[k];
  return out;
}

std::string dtype_name(torch::Dtype t)
{
  if (t == torch::kFloat64) return "float64";
  if (t == torch::kFloat32) return "float32";
  if (t == torch::kFloat16) return "float16";
  if (t == torch::kBFloat16) return "bfloat16";
  return "unknown dtype";
}

}    // namespace

/* ---------------------------------------------------------------------- */

PairTransIP::PairTransIP(LAMMPS *lmp) :
    Pair(lmp), device_request("cpu"), total_charge(0), multiplicity(1), prune(true),
    jit_optimize(-1), recompute(false), ghost_request("auto"), ghost_mode(GHOSTS_SHELL),
    feature_width(0), cutghost_before(0.0), cutghost_raised(0.0), check_masses(true),
    edges_request("auto"), device_edges(false),
    energy_unit(1.0), kcal_per_mol_per_ev(0.0), device(torch::kCPU),
    model_dtype(torch::kFloat64), model_cutoff(0.0), receptive_field(0.0), num_layers(0),
    format_version(0), electron_warning_given(false), nlocal_rows(0), max_owned_tag(0), report_load(false),
    cand_ncalls(-1), cand_nlocal(-1), cand_nghost(-1), ncandidates(0),
    halo_dtype(torch::kFloat64), border_ncalls(-1), border_nlocal(-1), border_nghost(-1)
{
  single_enable = 0;
  restartinfo = 0;
  one_coeff = 1;
  manybody_flag = 1;
  ghostneigh = 1;                          // neighbours of ghosts: message passing
  centroidstressflag = CENTROID_NOTAVAIL;  // no per-atom virial decomposition
  cutghost = nullptr;
}

PairTransIP::~PairTransIP()
{
  if (copymode) return;
  if (allocated) {
    memory->destroy(setflag);
    memory->destroy(cutsq);
    memory->destroy(cutghost);
  }
}

void PairTransIP::allocate()
{
  allocated = 1;
  const int n = atom->ntypes + 1;
  memory->create(setflag, n, n, "pair:setflag");
  memory->create(cutsq, n, n, "pair:cutsq");
  memory->create(cutghost, n, n, "pair:cutghost");
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      setflag[i][j] = 0;
      cutsq[i][j] = 0.0;
      cutghost[i][j] = 0.0;
    }
  type_to_z.assign(n, 0);
  type_symbol.assign(n, "NULL");
}

/* ----------------------------------------------------------------------
   pair_style transip [device cpu|cuda] [charge Q] [multiplicity M] [prune yes|no]
                      [jit_optimize yes|no] [ghosts auto|map|halo|shell] [recompute yes|no]
                      [check_masses yes|no] [edges auto|host|device]
------------------------------------------------------------------------- */

void PairTransIP::settings(int narg, char **arg)
{
  check_units_style("pair_style transip");

  std::string new_device = "cpu";
  int64_t new_charge = 0, new_mult = 1;
  bool new_prune = true;
  int new_jit = -1;
  bool new_recompute = false;
  std::string new_ghosts = "auto";
  bool new_check_masses = true;
  std::string new_edges = "auto";
  int iarg = 0;
  while (iarg < narg) {
    const std::string key = arg[iarg];
    if (iarg + 1 >= narg)
      error->all(FLERR, "pair_style transip: keyword '{}' needs a value", key);
    const std::string value = arg[iarg + 1];
    if (key == "device") {
      if (value != "cpu" && value != "cuda")
        error->all(FLERR, "pair_style transip: device must be 'cpu' or 'cuda', got '{}'", value);
      new_device = value;
    } else if (key == "charge") {
      new_charge = utils::inumeric(FLERR, value, false, lmp);
    } else if (key == "multiplicity" || key == "spin") {
      new_mult = utils::inumeric(FLERR, value, false, lmp);
      if (new_mult < 1)
        error->all(FLERR,
                   "pair_style transip: multiplicity is 2S+1 and must be >= 1, got {}",
                   new_mult);
    } else if (key == "prune") {
      new_prune = utils::logical(FLERR, value, false, lmp) == 1;
    } else if (key == "jit_optimize") {
      new_jit = utils::logical(FLERR, value, false, lmp);
    } else if (key == "recompute") {
      new_recompute = utils::logical(FLERR, value, false, lmp) == 1;
    } else if (key == "check_masses") {
      new_check_masses = utils::logical(FLERR, value, false, lmp) == 1;
    } else if (key == "ghosts") {
      if (value != "auto" && value != "map" && value != "halo" && value != "shell")
        error->all(FLERR,
                   "pair_style transip: ghosts must be auto, map, halo or shell, got '{}'",
                   value);
      new_ghosts = value;
    } else if (key == "edges") {
      if (value != "auto" && value != "host" && value != "device")
        error->all(FLERR, "pair_style transip: edges must be auto, host or device, got '{}'",
                   value);
      new_edges = value;
    } else {
      error->all(FLERR,
                 "pair_style transip: unknown keyword '{}' (expected device, charge, "
                 "multiplicity, ghosts, prune, recompute, jit_optimize, check_masses or edges)",
                 key);
    }
    iarg += 2;
  }

  const bool device_changed = (new_device != device_request);
  device_request = new_device;
  total_charge = new_charge;
  multiplicity = new_mult;
  prune = new_prune;
  jit_optimize = new_jit;
  recompute = new_recompute;
  ghost_request = new_ghosts;
  check_masses = new_check_masses;
  edges_request = new_edges;
  select_device();
  // pair_style issued again after pair_coeff: keep the model, move it if needed
  if (model && device_changed) model->module().to(device);
}

void PairTransIP::select_device()
{
  if (device_request == "cpu") {
    device = torch::Device(torch::kCPU);
    return;
  }
  if (!torch::cuda::is_available())
    error->all(FLERR,
               "pair_style transip device cuda: libtorch finds no usable CUDA device "
               "(torch::cuda::is_available() is false; no GPU visible, or a CPU-only "
               "libtorch). Use 'device cpu' or run on a GPU node");
  const int ndev = static_cast<int>(torch::cuda::device_count());
  // one GPU per node-local rank, round robin
  MPI_Comm node;
  MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, comm->me, MPI_INFO_NULL, &node);
  int local_rank = 0;
  MPI_Comm_rank(node, &local_rank);
  MPI_Comm_free(&node);
  device = torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(local_rank % ndev));
}


/* ----------------------------------------------------------------------
   Units. The model works in Å and eV. LAMMPS positions are Å in both supported styles, so
   only energies (total and per atom), forces and the virial are converted, by energy_unit,
   where the model's results enter LAMMPS (add_model_results).
------------------------------------------------------------------------- */

void PairTransIP::check_units_style(const char *where)
{
  const std::string style = update->unit_style;
  if (style == "metal" || style == "real") return;
  error->all(FLERR,
             "{}: TransIP supports 'units metal' (Å, eV) and 'units real' (Å, kcal/mol); "
             "this input uses 'units {}'. Switch the input to units metal or real",
             where, style);
}

// energy_unit for this input's unit style (checked by check_units_style). The eV -> kcal/mol
// factor is the model file's (the one source of unit constants: the exporter writes them from
// transip_md/units.py); the door reads it from the declaration or older files' metadata.
void PairTransIP::set_energy_unit()
{
  if (strcmp(update->unit_style, "metal") == 0) {
    energy_unit = 1.0;
    return;
  }
  if (!(kcal_per_mol_per_ev > 0.0))
    error->all(FLERR,
               "pair_style transip with 'units real' needs the eV -> kcal/mol factor from the "
               "model file, but '{}' gives none (no unit_factors.kcal_per_mol_per_ev, and its "
               "metadata_json has neither units.lammps_real.kcal_per_mol_per_ev nor "
               "units.openmm.kj_per_mol_per_ev: not written by the exporter?). Re-export it "
               "with python -m transip_md.export, or use units metal",
               model_path);
  energy_unit = kcal_per_mol_per_ev;
}

/* ----------------------------------------------------------------------
   pair_coeff * * model.pt El1 El2 ...  (one symbol or NULL per atom type)
------------------------------------------------------------------------- */

void PairTransIP::coeff(int narg, char **arg)
{
  if (!allocated) allocate();
  const int ntypes = atom->ntypes;

  if (narg < 3)
    error->all(FLERR,
               "pair_coeff for transip: expected 'pair_coeff * * model.pt' followed by one "
               "element symbol (or NULL) per atom type ({} types)",
               ntypes);
  if (strcmp(arg[0], "*") != 0 || strcmp(arg[1], "*") != 0)
    error->all(FLERR,
               "pair_coeff for transip must be 'pair_coeff * * model.pt El1 El2 ...', got "
               "'pair_coeff {} {} ...'",
               arg[0], arg[1]);
  const int nsym = narg - 3;
  if (nsym != ntypes)
    error->all(FLERR,
               "pair_coeff for transip: got {} element symbol(s) for {} atom types; give "
               "exactly one symbol (or NULL) per type, in type order",
               nsym, ntypes);

  load_model(arg[2]);
  set_energy_unit();
  mass_warnings_given.clear();

  // map types to elements
  const std::vector<std::string> &supported = model_elements;
  int mapped = 0;
  for (int t = 1; t <= ntypes; ++t) {
    const std::string sym = arg[2 + t];
    if (sym == "NULL") {
      type_to_z[t] = 0;
      type_symbol[t] = "NULL";
      continue;
    }
    const int z = transip::atomic_number(sym);
    if (z == 0) {
      const int any_case = transip::atomic_number_any_case(sym);
      if (any_case > 0)
        error->all(FLERR,
                   "pair_coeff for transip: '{}' (type {}) is not a chemical element symbol; "
                   "did you mean '{}'? Symbols are case sensitive",
                   sym, t, transip::element_symbol(any_case));
      error->all(FLERR,
                 "pair_coeff for transip: '{}' (type {}) is not a chemical element symbol "
                 "(use NULL to leave a type to another pair style)",
                 sym, t);
    }
    if (!model->species().count(sym))
      error->all(FLERR,
                 "pair_coeff for transip: element {} (type {}) is not supported by model '{}'; "
                 "it knows {}",
                 sym, t, model_path, join(supported, " "));
    type_to_z[t] = z;
    type_symbol[t] = sym;
    ++mapped;
  }
  if (mapped == 0)
    error->all(FLERR, "pair_coeff for transip: all atom types are NULL; map at least one");

  for (int i = 1; i <= ntypes; ++i)
    for (int j = i; j <= ntypes; ++j) {
      const int on = (type_to_z[i] > 0 && type_to_z[j] > 0) ? 1 : 0;
      setflag[i][j] = setflag[j][i] = on;
    }

  if (comm->me == 0) {
    std::string declaration;
    std::istringstream lines(model->describe());
    for (std::string line; std::getline(lines, line);) declaration += "  " + line + "\n";
    std::string mesg = fmt::format(
        "TransIP model {}\n  format_version {}, {}, cutoff {} Å, {} layers, receptive field "
        "{} Å, device {}\n  elements in the model: {}\n  charge {} e, multiplicity {}\n  "
        "{}\n{}  type map:\n",
        model_path, format_version, dtype_name(model_dtype), model_cutoff, num_layers,
        receptive_field, device.str(), join(supported, " "), total_charge, multiplicity,
        energy_unit == 1.0
            ? std::string("units metal: the model's eV and Å as they are")
            : fmt::format("units {}: energies, forces and virial x {:.12g} kcal/mol per eV ({} "
                          "of the model file); positions in Å",
                          update->unit_style, energy_unit, kcal_source),
        declaration);
    for (int t = 1; t <= ntypes; ++t) {
      if (type_to_z[t] > 0)
        mesg += fmt::format("    type {} -> {} (Z={})\n", t, type_symbol[t], type_to_z[t]);
      else
        mesg += fmt::format("    type {} -> NULL (not seen by the model)\n", t);
    }
    utils::logmesg(lmp, mesg);
  }
  if (mapped < ntypes && force->pair == this && comm->me == 0)
    error->warning(FLERR,
                   "pair_coeff for transip: some types are NULL; atoms of those types get no "
                   "forces from transip, so LAMMPS needs another pair style for them "
                   "(pair_style hybrid/overlay)");
  report_load = true;
}

// Collective: abort with the first rank's message if any rank failed.
void PairTransIP::all_agree_or_fail(const std::string &local_error)
{
  int bad = local_error.empty() ? 0 : 1, any_bad = 0;
  MPI_Allreduce(&bad, &any_bad, 1, MPI_INT, MPI_MAX, world);
  if (!any_bad) return;
  int root_bad = bad;
  MPI_Bcast(&root_bad, 1, MPI_INT, 0, world);
  if (root_bad) error->all(FLERR, local_error.empty() ? std::string("see rank 0") : local_error);
  if (bad) error->one(FLERR, local_error);
  // a rank that is fine waits here for the failing rank's MPI_Abort
  MPI_Barrier(world);
  error->all(FLERR, "pair_coeff for transip failed on another rank");
}

// The model file through the door (transip_model.h): every rank loads it; a refusal on any
// rank stops all of them with the door's message.
void PairTransIP::load_model(const std::string &path)
{
  model_path = path;
  std::string failure;
  std::unique_ptr<transip::Model> loaded;
  try {
    loaded = std::make_unique<transip::Model>(transip::Model::load(path, device, READER));
    // every ghost mode can fall back to the shell, which needs this one
    loaded->require({"local_energies_forces"}, "pair_style transip");
  } catch (const transip::ModelFileError &e) {
    failure = fmt::format("pair_coeff for transip: {}", e.what());
  } catch (const std::exception &e) {
    failure = fmt::format("pair_coeff for transip: cannot load model file '{}': {}", path,
                          transip::last_line_of(transip::error_text(e)));
  }
  all_agree_or_fail(failure);

  format_version = loaded->format_version();
  model_cutoff = loaded->cutoff();
  num_layers = loaded->num_layers();
  receptive_field = loaded->receptive_field();
  model_elements = loaded->elements();
  model_dtype = loaded->dtype();
  kcal_per_mol_per_ev = loaded->unit_factor("kcal_per_mol_per_ev");
  kcal_source = loaded->unit_factor_source("kcal_per_mol_per_ev");
  electron_warning_given = false;
  model = std::move(loaded);

  feature_width = 0;
  if (has_halo_entries()) {
    try {
      feature_width = model->method("halo_feature_width")({}).toInt();
    } catch (const std::exception &e) {
      error->all(FLERR, "pair_coeff for transip: halo_feature_width() of '{}' failed: {}", path,
                 transip::last_line_of(transip::error_text(e)));
    }
    if (feature_width < 1 || feature_width > 65536)
      error->all(FLERR, "pair_coeff for transip: '{}' declares {} features per atom", path,
                 feature_width);
  }
  if (comm->me == 0)
    for (const std::string &warning : model->warnings())
      error->warning(FLERR, "pair_coeff for transip: {}", warning);
}

bool PairTransIP::has_halo_entries() const
{
  for (const char *name : HALO_ENTRIES)
    if (!model->offers(name)) return false;
  return true;
}

/* ---------------------------------------------------------------------- */

void PairTransIP::init_style()
{
  if (!model) error->all(FLERR, "pair_style transip: pair_coeff * * model.pt ... is missing");
  check_units_style("pair_style transip");
  set_energy_unit();
  if (force->newton_pair == 0)
    error->all(FLERR,
               "pair_style transip requires 'newton on' (newton pair on): forces on ghost "
               "atoms are returned to their owners by reverse communication");
  if (domain->dimension != 3)
    error->all(FLERR, "pair_style transip works in 3d only (dimension 3)");
  if (comm->mode != Comm::SINGLE)
    error->all(FLERR,
               "pair_style transip needs comm_modify mode single (the ghost cutoff is set "
               "from the model's receptive field)");

  check_box();
  check_type_masses();
  check_electron_count();

  // Ghost modes (all exact, see the top of this file):
  //   map   (one rank)      periodic ghosts mapped to their owned atoms, ghosts to cutoff + skin
  //   halo  (any ranks)     per-layer feature exchange, ghosts to cutoff + skin
  //   shell (any ranks)     ghosts to receptive field + skin, model on the whole shell
  // auto = map on one rank (with atom IDs), else halo; shell only for model files without the
  // halo entry points (format_version 1).
  const bool has_periodic_entry = model->offers("mapped_energies_forces_virial");
  const bool has_halo_entry = has_halo_entries();
  const bool can_map = comm->nprocs == 1 && atom->tag_enable && has_periodic_entry;
  if (ghost_request == "map" && !can_map)
    error->all(FLERR,
               "pair_style transip ghosts map needs one MPI rank, atom IDs and a model file "
               "with mapped_energies_forces_virial() (lammps_periodic() in format <= 2; this "
               "run: {} ranks, atom IDs {}, entry {}); use ghosts halo, shell or auto",
               comm->nprocs, atom->tag_enable ? "on" : "off",
               has_periodic_entry ? "present" : "missing");
  if (ghost_request == "halo" && !has_halo_entry)
    error->all(FLERR,
               "pair_style transip ghosts halo needs a model file with the halo entry points "
               "(halo_edges, halo_embed, halo_layer, halo_readout: format_version >= 2); '{}' "
               "has format_version {} without them. Re-export it with this transip-md "
               "(python -m transip_md.export) or use ghosts shell",
               model_path, format_version);
  if (ghost_request == "map") {
    ghost_mode = GHOSTS_MAP;
  } else if (ghost_request == "halo") {
    ghost_mode = GHOSTS_HALO;
  } else if (ghost_request == "shell") {
    ghost_mode = GHOSTS_SHELL;
  } else if (can_map) {
    ghost_mode = GHOSTS_MAP;
  } else if (has_halo_entry) {
    ghost_mode = GHOSTS_HALO;
  } else {
    ghost_mode = GHOSTS_SHELL;
    if (comm->me == 0)
      error->warning(FLERR,
                     "pair_style transip: model file '{}' (format_version {}) has no halo entry "
                     "points; {} MPI ranks fall back to the receptive-field ghost shell (ghosts "
                     "to {:.4g} Å instead of {:.4g} Å: slower, same results). Re-export the "
                     "model with this transip-md for the per-layer halo exchange",
                     model_path, format_version, comm->nprocs,
                     receptive_field + neighbor->skin, model_cutoff + neighbor->skin);
  }

  // Features and their gradients travel as W doubles per atom through LAMMPS' buffers, sized
  // from comm_forward/comm_reverse by Comm::init() (called after this). Under pair_style
  // hybrid the top-level style's sizes are the ones that count.
  const int halo_size = ghost_mode == GHOSTS_HALO ? static_cast<int>(feature_width) : 0;
  comm_forward = comm_reverse = halo_size;
  if (force->pair && force->pair != this) {
    force->pair->comm_forward = std::max(force->pair->comm_forward, halo_size);
    force->pair->comm_reverse = std::max(force->pair->comm_reverse, halo_size);
  }

  // A ghost cutoff that shell mode raised in an earlier run is not needed any more.
  if (ghost_mode != GHOSTS_SHELL && cutghost_raised > 0.0 &&
      comm->cutghostuser == cutghost_raised) {
    comm->cutghostuser = cutghost_before;
    cutghost_raised = 0.0;
  }

  ghostneigh = ghost_mode == GHOSTS_SHELL ? 1 : 0;    // shell mode needs neighbours of ghosts

  // recompute yes in map mode: the model file checkpoints its own layers (low_memory attribute,
  // one layer's autograd graph at a time inside mapped_energies_forces_virial).
  const bool has_low_memory = model->module().hasattr("low_memory");
  if (ghost_mode == GHOSTS_MAP && recompute && !has_low_memory)
    error->all(FLERR,
               "pair_style transip recompute yes with ghosts map needs a model file with the "
               "low_memory attribute; re-export '{}' with this transip-md "
               "(python -m transip_md.export)",
               model_path);
  if (has_low_memory) model->module().setattr("low_memory", ghost_mode == GHOSTS_MAP && recompute);

  // edges device (pair_transip_device_edges.cpp): the model's edges are selected on its
  // device, from pairs uploaded once per neighbour-list build. auto: on a GPU in map mode,
  // where the host loop over LAMMPS' list cost more than the model (24,576 atoms, H200).
  if (edges_request == "device" && ghost_mode != GHOSTS_MAP)
    error->all(FLERR,
               "pair_style transip edges device needs ghosts map (one MPI rank with atom IDs); "
               "this run uses ghosts {}, whose edges are built on the host: use edges auto or "
               "host", ghost_mode == GHOSTS_HALO ? "halo" : "shell");
  device_edges = ghost_mode == GHOSTS_MAP &&
                 (edges_request == "device" || (edges_request == "auto" && device.is_cuda()));
  cand_ncalls = -1;    // candidates again at the first compute of this run

  if (ghost_mode == GHOSTS_MAP) {
    no_virial_fdotr_compute = 1;    // the model returns the virial of the mapped edges
    neighbor->add_request(this, NeighConst::REQ_FULL);
    if (comm->me == 0)
      utils::logmesg(lmp,
                     "TransIP: one rank: periodic ghosts mapped to their owned atoms; the "
                     "model runs on owned atoms only (ghost cutoff {:.4g} Å = cutoff + skin){}; "
                     "edges selected on {}\n",
                     model_cutoff + neighbor->skin,
                     recompute ? "; recompute yes: the model keeps one layer's autograd graph "
                                 "at a time (less memory, more time)"
                               : "",
                     device_edges ? "the model's device (edges device)" : "the host");
    return;
  }
  no_virial_fdotr_compute = 0;
  if (ghost_mode == GHOSTS_HALO) {
    neighbor->add_request(this, NeighConst::REQ_FULL);
    if (comm->me == 0)
      utils::logmesg(lmp,
                     "TransIP: halo exchange over {} rank(s): ghosts to {:.4g} Å = cutoff + "
                     "skin; between the {} layers each rank sends {} features per boundary atom "
                     "to its neighbours and, in the backward pass, the gradients of its ghost "
                     "atoms back to their owners{}\n",
                     comm->nprocs, model_cutoff + neighbor->skin, num_layers, feature_width,
                     recompute ? "; recompute yes: layers are re-run in the backward pass, one "
                                 "autograd graph at a time (less memory, more time)"
                               : "");
    return;
  }
  neighbor->add_request(this, NeighConst::REQ_FULL | NeighConst::REQ_GHOST);

  // Ghost atoms must reach every atom that can influence an owned atom's
  // energy: receptive field = layers x cutoff, plus the skin atoms may move
  // between neighbour list builds.
  const double need = receptive_field + neighbor->skin;
  if (comm->cutghostuser < need) {
    const double before = comm->cutghostuser;
    if (cutghost_raised == 0.0) cutghost_before = before;
    comm->cutghostuser = need;
    cutghost_raised = need;
    if (comm->me == 0) {
      // ghost shell volume relative to an owned cube of edge a (per rank), uniform density
      const double volume = domain->xprd * domain->yprd * domain->zprd;
      const double a = std::cbrt(volume / comm->nprocs);
      const double ratio = std::pow((a + 2.0 * need) / a, 3.0) - 1.0;
      utils::logmesg(lmp,
                     "TransIP: ghost communication cutoff set to {:.4g} Å (was {:.4g}) = "
                     "receptive field {:.4g} Å ({} layers x {:.4g} Å) + skin {:.4g} Å\n"
                     "TransIP: cost: LAMMPS keeps ~{:.1f} ghost atoms per owned atom for "
                     "~{:.3g} Å subdomains (periodic, uniform density); the model sees only "
                     "those within {} neighbour hops of owned atoms{}\n",
                     need, before, receptive_field, num_layers, model_cutoff, neighbor->skin,
                     ratio, a, num_layers,
                     (prune && can_prune()) ? "" : " (pruning off: all of them)");
    }
  }
}

/* ----------------------------------------------------------------------
   Per-type masses against the mapped elements' standard masses (g/mol in both units metal
   and real): a type whose mass is far from its element's usually means the element symbols in
   pair_coeff are in another order than the types. Warns (rank 0, each case once); per-atom
   masses (atom styles with rmass) and types without a mass yet are not checked.
------------------------------------------------------------------------- */

void PairTransIP::check_type_masses()
{
  if (!check_masses || atom->rmass_flag || !atom->mass || !atom->mass_setflag) return;
  const int ntypes = atom->ntypes;
  std::vector<std::string> listed;
  for (int t = 1; t <= ntypes; ++t) listed.push_back(type_symbol[t]);
  for (int t = 1; t <= ntypes; ++t) {
    const int z = static_cast<int>(type_to_z[t]);
    if (z <= 0 || z > transip::kMaxAtomicNumber || !atom->mass_setflag[t]) continue;
    const double mass = atom->mass[t], standard = transip::standard_mass(z);
    if (std::fabs(mass - standard) <= MASS_TOLERANCE * standard) continue;
    const std::string message = fmt::format(
        "pair_coeff for transip: atom type {} is mapped to {} ({:.6g} g/mol) but has mass "
        "{:.6g}{}; check the element order in pair_coeff (types 1..{} map to the listed "
        "elements: {}). If this is intended (an isotope), add 'check_masses no' to pair_style "
        "transip",
        t, type_symbol[t], standard, mass, mass_mismatch_hint(mass, z), ntypes,
        join(listed, " "));
    if (std::find(mass_warnings_given.begin(), mass_warnings_given.end(), message) !=
        mass_warnings_given.end())
      continue;
    mass_warnings_given.push_back(message);
    if (comm->me == 0) error->warning(FLERR, message);
  }
}

/* ----------------------------------------------------------------------
   Charge and multiplicity against the model's range and the electron count of the whole
   system: the model's own rules (validate, validate_electrons), the latter fed with the sum
   of atomic numbers and the number of atoms of mapped types over the owned atoms of all ranks
   (ghosts excluded; NULL types are not part of the model's system). Redone at every run
   setup, so a changed atom count is seen.
------------------------------------------------------------------------- */

void PairTransIP::check_electron_count()
{
  const int *type = atom->type;
  long long mine[2] = {0, 0}, all[2] = {0, 0};    // sum of Z, atoms
  int64_t probe_z = 0;                            // a mapped element, for the range check
  for (int t = 1; t <= atom->ntypes && probe_z == 0; ++t) probe_z = type_to_z[t];
  for (int i = 0; i < atom->nlocal; ++i) {
    const int64_t z = type_to_z[type[i]];
    if (z <= 0) continue;
    mine[0] += z;
    mine[1] += 1;
  }
  MPI_Allreduce(mine, all, 2, MPI_LONG_LONG, MPI_SUM, world);
  if (all[1] == 0) return;    // no atoms for the model yet

  // The model's range of charge and multiplicity first (its validate() on a one-atom probe of a
  // mapped element): "total charge 99 is outside the model's range" says more than a parity
  // verdict on 221 electrons. Every rank has the same sums and model: the same verdict.
  const auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  transip::ModelMessage why = model->refusal(
      "validate", {torch::zeros({1, 3}, torch::TensorOptions().dtype(model_dtype)).to(device),
                   torch::full({1}, probe_z, i64).to(device),
                   torch::scalar_tensor(total_charge, i64).to(device),
                   torch::scalar_tensor(multiplicity, i64).to(device)});
  if (!why.empty())
    error->all(FLERR, fmt::format("pair_style transip: charge {} / multiplicity {} (pair_style "
                                  "keywords): {}. Choose values the model was trained for",
                                  total_charge, multiplicity, why.text));

  if (!model->offers("validate_electrons")) {
    if (!electron_warning_given && comm->me == 0)
      error->warning(FLERR,
                     "pair_style transip: model file '{}' predates the electron-count check (it "
                     "has no validate_electrons()); charge {} and multiplicity {} are not "
                     "checked against the atoms' electron count. Re-export it with python -m "
                     "transip_md.export",
                     model_path, total_charge, multiplicity);
    electron_warning_given = true;
    return;
  }
  why = model->refusal("validate_electrons", {static_cast<int64_t>(all[0]), total_charge,
                                              multiplicity, static_cast<int64_t>(all[1])});
  if (!why.empty())
    error->all(FLERR,
               fmt::format("pair_style transip: charge {} and multiplicity {} are impossible for "
                           "this system: {}. Set charge and multiplicity on the pair_style "
                           "transip line to the system's real state",
                           total_charge, multiplicity, why.text));
}

/* ----------------------------------------------------------------------
   The periodic box. The model's one cell rule (validate_cell: zero, degenerate or left-handed
   cells, more than max_images periodic images per axis) judges LAMMPS' box, with the same words
   as every other engine; files without validate_cell (format <= 2) get the images rule here.
   Then a LAMMPS limit, not a model rule: a box much smaller than the cutoff gives every atom
   hundreds of periodic images of itself, and LAMMPS would stop with "Neighbor list overflow,
   boost neigh_modify one"; say what is wrong instead. Boxes a bit thinner than the cutoff are
   fine (images become more neighbours).
------------------------------------------------------------------------- */

void PairTransIP::check_box()
{
  const int periodic[3] = {domain->xperiodic, domain->yperiodic, domain->zperiodic};
  if (!periodic[0] && !periodic[1] && !periodic[2]) return;
  // lattice vectors a = (xprd, 0, 0), b = (xy, yprd, 0), c = (xz, yz, zprd)
  const double a[3] = {domain->xprd, 0.0, 0.0};
  const double b[3] = {domain->xy, domain->yprd, 0.0};
  const double c[3] = {domain->xz, domain->yz, domain->zprd};
  auto cross_norm = [](const double *u, const double *v) {
    const double w0 = u[1] * v[2] - u[2] * v[1];
    const double w1 = u[2] * v[0] - u[0] * v[2];
    const double w2 = u[0] * v[1] - u[1] * v[0];
    return std::sqrt(w0 * w0 + w1 * w1 + w2 * w2);
  };
  const double volume = domain->xprd * domain->yprd * domain->zprd;
  if (!(volume > 0.0)) return;    // LAMMPS refuses such boxes itself
  const double face[3] = {volume / cross_norm(b, c), volume / cross_norm(c, a),
                          volume / cross_norm(a, b)};
  const char *axis = "xyz";
  const std::string box =
      fmt::format("{:.4g} x {:.4g} x {:.4g} Å{}", domain->xprd, domain->yprd, domain->zprd,
                  domain->triclinic ? fmt::format(", tilts xy {:.4g} xz {:.4g} yz {:.4g}",
                                                  domain->xy, domain->xz, domain->yz)
                                    : std::string());
  if (model->offers("validate_cell")) {
    // CPU tensors: the rule is arithmetic on its arguments (no model weights involved)
    const double rows[9] = {a[0], a[1], a[2], b[0], b[1], b[2], c[0], c[1], c[2]};
    const torch::Tensor cell =
        torch::from_blob(const_cast<double *>(rows), {3, 3},
                         torch::TensorOptions().dtype(torch::kFloat64)).clone();
    const torch::Tensor pbc = torch::tensor({periodic[0] != 0, periodic[1] != 0,
                                             periodic[2] != 0}, torch::kBool);
    const transip::ModelMessage why = model->refusal("validate_cell", {cell, pbc});
    if (!why.empty())
      error->all(FLERR, "pair_style transip: the model refuses the periodic box ({}): {}", box,
                 why.text);
  } else {
    const double max_images = model->limit("max_images", 64.0);
    for (int k = 0; k < 3; ++k)
      if (periodic[k] && face[k] * max_images < model_cutoff)
        error->all(FLERR,
                   "pair_style transip: the periodic box ({}) is too thin along {}: {:.4g} Å "
                   "between faces for a model cutoff of {:.4g} Å (more than {:.0f} periodic "
                   "images per axis); check the box size and units",
                   box, axis[k], face[k], model_cutoff, max_images);
  }
  if (!(periodic[0] && periodic[1] && periodic[2])) return;
  const double thinnest = std::min(face[0], std::min(face[1], face[2]));
  if (thinnest >= model_cutoff) return;
  const double reach = model_cutoff + neighbor->skin;
  const double per_atom = static_cast<double>(atom->natoms) / volume * 4.0 / 3.0 * M_PI *
      reach * reach * reach;
  if (per_atom > neighbor->oneatom)
    error->all(FLERR,
               "pair_style transip: the periodic box ({}, {} atom{}) is smaller than the model "
               "cutoff {:.4g} Å ({:.4g} Å between the closest faces): each atom would have ~{:.0f} "
               "neighbours within cutoff + skin = {:.4g} Å, most of them periodic images of the "
               "same few atoms, more than a LAMMPS neighbour list holds (neigh_modify one {}). "
               "Check the box size and units; if the box is intended, raise neigh_modify one "
               "and page",
               box, atom->natoms, atom->natoms == 1 ? "" : "s", model_cutoff, thinnest, per_atom,
               reach, neighbor->oneatom);
}

// Pruning by graph distance is exact when the receptive field is layers x
// cutoff (each layer looks one neighbour shell further), as the model
// contract declares; anything else is evaluated on the full ghost shell.
bool PairTransIP::can_prune() const
{
  return num_layers >= 1 &&
      std::fabs(receptive_field - double(num_layers) * model_cutoff) <= 1e-6 * receptive_field;
}

double PairTransIP::init_one(int i, int j)
{
  // also for NULL types (hybrid): the list only needs a cutoff, compute() skips them
  cutghost[i][j] = cutghost[j][i] = model_cutoff;
  return model_cutoff;
}

/* ---------------------------------------------------------------------- */

// The model names atoms by their row in its input (owned atoms first, then ghosts), in the
// suffix " [atom rows: i j]" that the door split off; LAMMPS users know atom IDs.
std::string PairTransIP::atom_ids_of_rows(const std::vector<int64_t> &rows) const
{
  std::string out;
  for (const int64_t row : rows) {
    if (row < 0 || row >= static_cast<int64_t>(row_to_atom.size())) continue;
    const int i = row_to_atom[row];
    out += fmt::format("{}row {} = atom ID {}{}", out.empty() ? "" : ", ", row,
                       atom->tag_enable ? std::to_string(atom->tag[i]) : std::string("?"),
                       i < atom->nlocal ? "" : " (ghost image)");
  }
  return out.empty() ? out : " [" + out + "]";
}

[[noreturn]] void PairTransIP::model_failed(const transip::ModelMessage &why)
{
  error->one(FLERR, "pair_style transip: the model failed at step {}: {}{}", update->ntimestep,
             why.text, atom_ids_of_rows(why.rows));
}

void PairTransIP::compute(int eflag, int vflag)
{
  ev_init(eflag, vflag);
  if (vflag_atom || cvflag_atom)
    error->all(FLERR,
               "pair_style transip does not provide per-atom virials (compute stress/atom, "
               "compute centroid/stress/atom); the global virial/pressure is available");

  // phases (pair_transip_timing.h): rows here, to device .. to host in evaluate_model() or
  // compute_halo(), scatter (add_model_results and the fdotr virial) closed here
  phase_times.start();
  if (device_edges)
    prepare_device_edges();    // rows and candidate pairs, at each neighbour-list build
  else
    build_rows();
  phase_times.lap(transip::PhaseTimes::ROWS);
  if (ghost_mode == GHOSTS_HALO)
    compute_halo();
  else
    evaluate_model();
  if (vflag_fdotr) virial_fdotr_compute();
  phase_times.lap(transip::PhaseTimes::SCATTER);
  if (update->setupflag)    // a run's setup: not a timestep; the run's account starts here
    phase_times.restart();
  else
    ++phase_times.steps;
}

// map and shell modes: one call of the model on the rows. An empty subdomain (or one holding
// only NULL-type atoms) has no energy of its own; its ghosts' forces come from the ranks that
// own neighbours.
void PairTransIP::evaluate_model()
{
  if (nlocal_rows == 0) return;
  const bool mapped = ghost_mode == GHOSTS_MAP;
  const char *entry = mapped ? "mapped_energies_forces_virial" : "local_energies_forces";
  const int64_t nrows = static_cast<int64_t>(row_to_atom.size());
  torch::Tensor energies, forces, wvir;
  try {
    const ModelInputs in = model_inputs();
    phase_times.lap(transip::PhaseTimes::TO_DEVICE);
    // The profiling graph executor re-specialises on every new neighbour count; that costs
    // more than it gains (measured 17-40% slower on the CPU, 1.45x slower on an H100), so it
    // is off unless asked for. Thread-local, restored.
    torch::jit::GraphOptimizerEnabledGuard jit_guard(jit_optimize == 1);
    c10::IValue out;
    if (mapped) {
      out = model->method(entry)({in.pos, in.numbers, in.edge_i, in.edge_j, in.shift,
                                  in.charge, in.spin});
    } else {
      out = model->method(entry)({in.pos, in.numbers, in.edge_i, in.edge_j, nlocal_rows,
                                  in.charge, in.spin});
    }
    phase_times.lap(transip::PhaseTimes::MODEL);
    const auto result = out.toTuple();
    auto host = [&](int k) {
      return result->elements().at(k).toTensor().to(torch::kCPU, torch::kFloat64).contiguous();
    };
    energies = host(0);
    forces = host(1);
    if (mapped) wvir = host(2);
    phase_times.lap(transip::PhaseTimes::TO_HOST);
  } catch (const std::exception &e) {
    model_failed(transip::translate_model_error(e));
  }
  if (energies.dim() != 1 || energies.size(0) != nlocal_rows || forces.dim() != 2 ||
      forces.size(0) != nrows || forces.size(1) != 3 || (mapped && wvir.numel() != 6)) {
    std::ostringstream got;
    got << model->method_name(entry) << "() returned energies of shape " << energies.sizes()
        << " and forces of shape " << forces.sizes() << ", expected [" << nlocal_rows
        << "] and [" << nrows << ", 3]" << (mapped ? " and a virial of 6" : "");
    model_failed({got.str(), {}});
  }
  add_model_results(forces.data_ptr<double>(), energies.data_ptr<double>(),
                    mapped ? wvir.data_ptr<double>() : nullptr);
}

double PairTransIP::memory_usage()
{
  double bytes = Pair::memory_usage();
  bytes += atom_to_row.capacity() * sizeof(int) + row_to_atom.capacity() * sizeof(int);
  bytes += pos_buf.capacity() * sizeof(double) + z_buf.capacity() * sizeof(int64_t);
  bytes += (edge_i_buf.capacity() + edge_j_buf.capacity()) * sizeof(int64_t);
  bytes += shift_buf.capacity() * sizeof(double);
  bytes += double(ncandidates) * 3 * sizeof(int32_t);    // edges device, on the model's device
  for (const torch::Tensor *block : {&border_feat, &ghost_feat, &border_grad})
    if (block->defined()) bytes += double(block->numel() * block->element_size());
  bytes += (border_atoms.capacity() + border_slot.capacity() + ghost_slot.capacity()) * sizeof(int);
  return bytes;
}
