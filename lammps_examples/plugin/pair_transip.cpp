/* ----------------------------------------------------------------------
   pair_style transip: see pair_transip.h and lammps_examples/README.md.

   Data flow per step (compute):
     owned + ghost atoms of mapped types  -> positions [rows, 3], Z [rows]
     full neighbour list incl. ghosts     -> directed edges (row_i, row_j)
     model.lammps(...)                    -> local energies, forces on all rows
     forces on ghosts go into atom->f; LAMMPS' reverse communication (newton
     pair on) hands them to their owners; the virial is sum_i x_i . f_i.
   The model is exact when ghosts reach its receptive field (layers x cutoff),
   which init_style() guarantees through the ghost communication cutoff.

   That is the `ghosts shell` mode. The default modes avoid the thick shell:
   `map` (one rank, compute_owner_mapped) maps periodic ghosts to the owned
   atoms they image; `halo` (several ranks, compute_halo) keeps ghosts only to
   cutoff + skin and runs the network layer by layer, exchanging the features
   of boundary atoms between layers (forward communication) and the gradients
   ghost atoms received back to their owners in the backward pass (reverse
   communication). All modes give the same energies and forces.
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
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/jit/runtime/graph_executor.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cctype>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <locale>
#include <mpi.h>
#include <regex>
#include <sstream>

using namespace LAMMPS_NS;

namespace {

// Chemical symbols indexed by atomic number (index 0 is a placeholder).
const char *const ELEMENT_SYMBOLS[] = {
    "X",  "H",  "He", "Li", "Be", "B",  "C",  "N",  "O",  "F",  "Ne", "Na", "Mg", "Al", "Si",
    "P",  "S",  "Cl", "Ar", "K",  "Ca", "Sc", "Ti", "V",  "Cr", "Mn", "Fe", "Co", "Ni", "Cu",
    "Zn", "Ga", "Ge", "As", "Se", "Br", "Kr", "Rb", "Sr", "Y",  "Zr", "Nb", "Mo", "Tc", "Ru",
    "Rh", "Pd", "Ag", "Cd", "In", "Sn", "Sb", "Te", "I",  "Xe", "Cs", "Ba", "La", "Ce", "Pr",
    "Nd", "Pm", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "Lu", "Hf", "Ta", "W",
    "Re", "Os", "Ir", "Pt", "Au", "Hg", "Tl", "Pb", "Bi", "Po", "At", "Rn", "Fr", "Ra", "Ac",
    "Th", "Pa", "U",  "Np", "Pu", "Am", "Cm", "Bk", "Cf", "Es", "Fm", "Md", "No", "Lr", "Rf",
    "Db", "Sg", "Bh", "Hs", "Mt", "Ds", "Rg", "Cn", "Nh", "Fl", "Mc", "Lv", "Ts", "Og"};
constexpr int MAX_Z = sizeof(ELEMENT_SYMBOLS) / sizeof(ELEMENT_SYMBOLS[0]) - 1;

// Atomic number of an exact chemical symbol, 0 if it is none.
int symbol_to_z(const std::string &symbol)
{
  for (int z = 1; z <= MAX_Z; ++z)
    if (symbol == ELEMENT_SYMBOLS[z]) return z;
  return 0;
}

// A symbol that differs only in letter case ("CL" -> "Cl"), or "" if none.
std::string case_insensitive_symbol(const std::string &symbol)
{
  for (int z = 1; z <= MAX_Z; ++z) {
    const std::string s = ELEMENT_SYMBOLS[z];
    if (s.size() != symbol.size()) continue;
    bool same = true;
    for (size_t k = 0; k < s.size(); ++k)
      if (std::tolower(static_cast<unsigned char>(s[k])) !=
          std::tolower(static_cast<unsigned char>(symbol[k])))
        same = false;
    if (same) return s;
  }
  return "";
}

// Standard atomic masses (g/mol) indexed by atomic number (index 0 is a placeholder): the
// IUPAC 2016 conventional values as ASE ships them (ase.data.atomic_masses_iupac2016, ASE's
// default table); elements without a stable isotope have their longest-lived isotope's mass.
const double STANDARD_MASSES[] = {
    0.0,
    1.008, 4.0026, 6.94, 9.01218, 10.81, 12.011, 14.007, 15.999, 18.9984, 20.1797, 22.9898,
    24.305, 26.9815, 28.085, 30.9738, 32.06, 35.45, 39.948, 39.0983, 40.078, 44.9559, 47.867,
    50.9415, 51.9961, 54.938, 55.845, 58.9332, 58.6934, 63.546, 65.38, 69.723, 72.63, 74.9216,
    78.971, 79.904, 83.798, 85.4678, 87.62, 88.9058, 91.224, 92.9064, 95.95, 97.9072, 101.07,
    102.906, 106.42, 107.868, 112.414, 114.818, 118.71, 121.76, 127.6, 126.904, 131.293,
    132.905, 137.327, 138.905, 140.116, 140.908, 144.242, 144.913, 150.36, 151.964, 157.25,
    158.925, 162.5, 164.93, 167.259, 168.934, 173.054, 174.967, 178.49, 180.948, 183.84,
    186.207, 190.23, 192.217, 195.084, 196.967, 200.592, 204.38, 207.2, 208.98, 208.982,
    209.987, 222.018, 223.02, 226.025, 227.028, 232.038, 231.036, 238.029, 237.048, 244.064,
    243.061, 247.07, 247.07, 251.08, 252.083, 257.095, 258.098, 259.101, 262.11, 267.122,
    268.126, 271.134, 270.133, 269.134, 278.156, 281.165, 281.166, 285.177, 286.182, 289.19,
    289.194, 293.204, 293.208, 294.214};
static_assert(sizeof(STANDARD_MASSES) / sizeof(STANDARD_MASSES[0]) == MAX_Z + 1,
              "one standard mass per element symbol");

// A type's mass further than this (relative) from its element's standard mass is warned about.
constexpr double MASS_TOLERANCE = 0.1;

// Why a per-type mass may differ from element z's: it is another element's standard mass
// (types mapped in the wrong order), or within a few mass units of it (an isotope such as
// deuterium 2.014 for H). "" if neither.
std::string mass_mismatch_hint(double mass, int z)
{
  for (int other = 1; other <= MAX_Z; ++other)
    if (other != z && std::fabs(mass - STANDARD_MASSES[other]) <= 0.005 * STANDARD_MASSES[other])
      return fmt::format(", the standard mass of {}", ELEMENT_SYMBOLS[other]);
  if (std::fabs(mass - STANDARD_MASSES[z]) <= 3.5)
    return fmt::format(", which may be an isotope of {}", ELEMENT_SYMBOLS[z]);
  return "";
}

// ---- a few numbers from the model's metadata JSON (module attribute metadata_json), without
// a JSON library. The exporter writes it with json.dumps: keys are quoted, keys within one
// object are unique; only objects and numbers along the looked-up path matter here.

// Offset of the value stored under "key" in json[from, to) (whitespace after the colon
// skipped), std::string::npos if the key is not there.
size_t json_value_of(const std::string &json, const std::string &key, size_t from, size_t to)
{
  const std::string quoted = "\"" + key + "\"";
  for (size_t at = json.find(quoted, from); at != std::string::npos && at < to;
       at = json.find(quoted, at + 1)) {
    size_t k = at + quoted.size();
    while (k < to && std::isspace(static_cast<unsigned char>(json[k]))) ++k;
    if (k >= to || json[k] != ':') continue;    // the text of a value, not a key
    ++k;
    while (k < to && std::isspace(static_cast<unsigned char>(json[k]))) ++k;
    if (k < to) return k;
  }
  return std::string::npos;
}

// One past the '}' closing the object that starts at json[start] == '{' (strings skipped),
// std::string::npos if it is not closed.
size_t json_object_end(const std::string &json, size_t start)
{
  int depth = 0;
  bool in_string = false;
  for (size_t k = start; k < json.size(); ++k) {
    const char c = json[k];
    if (in_string) {
      if (c == '\\') ++k;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{') {
      ++depth;
    } else if (c == '}' && --depth == 0) {
      return k + 1;
    }
  }
  return std::string::npos;
}

// The number at path (object keys, the last one naming a number), e.g. {"units",
// "lammps_real", "kcal_per_mol_per_ev"}; false if a key is missing or the value is no number.
bool json_number_at(const std::string &json, const std::vector<std::string> &path, double &value)
{
  size_t from = 0, to = json.size();
  for (size_t level = 0; level < path.size(); ++level) {
    const size_t at = json_value_of(json, path[level], from, to);
    if (at == std::string::npos) return false;
    if (level + 1 == path.size()) {
      std::istringstream in(json.substr(at, to - at));
      in.imbue(std::locale::classic());    // '.' decimal point whatever the process locale
      double v = 0.0;
      if (!(in >> v) || !std::isfinite(v)) return false;
      value = v;
      return true;
    }
    if (json[at] != '{') return false;
    const size_t end = json_object_end(json, at);
    if (end == std::string::npos || end > to) return false;
    from = at;
    to = end;
  }
  return false;
}

// ---- a minimal zip reader (central directory, stored entries), enough to tell a TorchScript
// archive from a torch.save() file before torch::jit::load fails on it. Both are zip files
// written by PyTorch (zip64 records included); the fields are little endian.
uint64_t le(const unsigned char *p, int bytes)
{
  uint64_t v = 0;
  for (int k = bytes - 1; k >= 0; --k) v = (v << 8) | p[k];
  return v;
}

struct ZipEntry {
  std::string name;
  uint64_t method;          // 0: stored
  uint64_t size;            // compressed size
  uint64_t local_offset;    // of the local file header
};

enum class ZipStatus { OK, NOT_ZIP, DAMAGED };

bool read_at(std::FILE *fp, uint64_t offset, size_t bytes, std::vector<unsigned char> &buf)
{
  buf.resize(bytes);
  if (fseeko(fp, static_cast<off_t>(offset), SEEK_SET) != 0) return false;
  return bytes == 0 || std::fread(buf.data(), 1, bytes, fp) == bytes;
}

ZipStatus read_zip_directory(std::FILE *fp, std::vector<ZipEntry> &entries)
{
  entries.clear();
  if (fseeko(fp, 0, SEEK_END) != 0) return ZipStatus::NOT_ZIP;
  const uint64_t size = static_cast<uint64_t>(ftello(fp));
  std::vector<unsigned char> buf;
  if (size < 22 || !read_at(fp, 0, 4, buf) || le(buf.data(), 4) != 0x04034b50)
    return ZipStatus::NOT_ZIP;    // a zip file starts with a local file header "PK\3\4"
  // end of central directory record: 22 bytes + a comment of up to 65535 bytes, at the end
  const uint64_t tail = std::min<uint64_t>(size, 22 + 65535);
  if (!read_at(fp, size - tail, tail, buf)) return ZipStatus::DAMAGED;
  int64_t eocd = -1;
  for (int64_t k = static_cast<int64_t>(tail) - 22; k >= 0; --k)
    if (le(&buf[k], 4) == 0x06054b50) {
      eocd = k;
      break;
    }
  if (eocd < 0) return ZipStatus::DAMAGED;    // truncated: the directory is written last
  uint64_t count = le(&buf[eocd + 10], 2), dir_size = le(&buf[eocd + 12], 4),
           dir_offset = le(&buf[eocd + 16], 4);
  if (count == 0xFFFF || dir_size == 0xFFFFFFFF || dir_offset == 0xFFFFFFFF) {
    // zip64: a locator (20 bytes) right before the record points to the zip64 record
    const uint64_t eocd_at = size - tail + static_cast<uint64_t>(eocd);
    std::vector<unsigned char> rec;
    if (eocd_at < 20 || !read_at(fp, eocd_at - 20, 20, rec) || le(rec.data(), 4) != 0x07064b50)
      return ZipStatus::DAMAGED;
    const uint64_t z64 = le(&rec[8], 8);
    if (z64 + 56 > size || !read_at(fp, z64, 56, rec) || le(rec.data(), 4) != 0x06064b50)
      return ZipStatus::DAMAGED;
    count = le(&rec[32], 8);
    dir_size = le(&rec[40], 8);
    dir_offset = le(&rec[48], 8);
  }
  if (dir_offset + dir_size > size || dir_size > (uint64_t(1) << 28) || count > dir_size / 46)
    return ZipStatus::DAMAGED;
  std::vector<unsigned char> dir;
  if (!read_at(fp, dir_offset, dir_size, dir)) return ZipStatus::DAMAGED;
  size_t k = 0;
  for (uint64_t n = 0; n < count; ++n) {
    if (k + 46 > dir.size() || le(&dir[k], 4) != 0x02014b50) return ZipStatus::DAMAGED;
    const size_t name_len = le(&dir[k + 28], 2), extra_len = le(&dir[k + 30], 2),
                 comment_len = le(&dir[k + 32], 2);
    if (k + 46 + name_len + extra_len + comment_len > dir.size()) return ZipStatus::DAMAGED;
    ZipEntry e;
    e.name.assign(reinterpret_cast<const char *>(&dir[k + 46]), name_len);
    e.method = le(&dir[k + 10], 2);
    e.size = le(&dir[k + 20], 4);
    const uint64_t usize = le(&dir[k + 24], 4);
    e.local_offset = le(&dir[k + 42], 4);
    // zip64 extra field (id 1): the 64-bit values of the fields set to 0xFFFFFFFF, in order
    for (size_t x = k + 46 + name_len; x + 4 <= k + 46 + name_len + extra_len;) {
      const uint64_t id = le(&dir[x], 2), len = le(&dir[x + 2], 2);
      if (x + 4 + len > dir.size()) break;
      if (id == 1) {
        size_t f = x + 4;
        if (usize == 0xFFFFFFFF && f + 8 <= x + 4 + len) f += 8;
        if (e.size == 0xFFFFFFFF && f + 8 <= x + 4 + len) e.size = le(&dir[f], 8), f += 8;
        if (e.local_offset == 0xFFFFFFFF && f + 8 <= x + 4 + len) e.local_offset = le(&dir[f], 8);
      }
      x += 4 + len;
    }
    entries.push_back(e);
    k += 46 + name_len + extra_len + comment_len;
  }
  return ZipStatus::OK;
}

// Whether a stored (uncompressed) entry of at most 64 MiB contains `needle`.
bool zip_entry_contains(std::FILE *fp, const ZipEntry &e, const std::string &needle)
{
  std::vector<unsigned char> head, data;
  if (e.method != 0 || e.size > (uint64_t(1) << 26)) return false;
  if (!read_at(fp, e.local_offset, 30, head) || le(head.data(), 4) != 0x04034b50) return false;
  const uint64_t start = e.local_offset + 30 + le(&head[26], 2) + le(&head[28], 2);
  if (!read_at(fp, start, e.size, data)) return false;
  return std::search(data.begin(), data.end(), needle.begin(), needle.end()) != data.end();
}

bool ends_with(const std::string &s, const std::string &tail)
{
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

std::string join(const std::vector<std::string> &items, const char *sep)
{
  std::string out;
  for (size_t k = 0; k < items.size(); ++k) out += (k ? sep : "") + items[k];
  return out;
}

// TorchScript errors carry the interpreter's traceback; the user-facing
// reason is the last non-empty line ("builtins.ValueError: element C ...").
std::string last_line_of(const std::string &text)
{
  std::istringstream in(text);
  std::string line, last;
  while (std::getline(in, line)) {
    const auto first = line.find_first_not_of(" \t\r");
    if (first == std::string::npos) continue;
    // c10 appends its own C++ backtrace after "Exception raised from"; stop there.
    if (line.compare(first, 21, "Exception raised from") == 0) break;
    last = line.substr(first);
  }
  const std::string prefix = "builtins.";
  if (last.compare(0, prefix.size(), prefix) == 0) last = last.substr(prefix.size());
  return last.empty() ? text : last;
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
    jit_optimize(-1), recompute(false), ghost_request("auto"), ghost_mode(GHOSTS_SHELL), has_periodic_entry(false),
    has_halo_entry(false), feature_width(0), cutghost_before(0.0), cutghost_raised(0.0),
    check_masses(true), energy_unit(1.0), kcal_per_mol_per_ev(0.0), device(torch::kCPU),
    model_dtype(torch::kFloat64), model_cutoff(0.0), receptive_field(0.0), num_layers(0),
    format_version(0), has_electron_check(false), electron_warning_given(false),
    report_load(false), halo_dtype(torch::kFloat64), halo_nlocal_rows(0),
    border_ncalls(-1), border_nlocal(-1), border_nghost(-1)
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
                      [check_masses yes|no]
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
    } else {
      error->all(FLERR,
                 "pair_style transip: unknown keyword '{}' (expected device, charge, "
                 "multiplicity, ghosts, prune, recompute, jit_optimize or check_masses)",
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
  select_device();
  // pair_style issued again after pair_coeff: keep the model, move it if needed
  if (model && device_changed) model->to(device);
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
   where the model's results enter LAMMPS (add_model_results, compute_owner_mapped).
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

// The eV -> kcal/mol factor of the model file, from its metadata_json (the one source of unit
// constants: the exporter writes them from transip_md/units.py).
void PairTransIP::read_unit_conversion()
{
  kcal_per_mol_per_ev = 0.0;
  kcal_source.clear();
  if (!model->hasattr("metadata_json") || !model->attr("metadata_json").isString()) return;
  const std::string json = model->attr("metadata_json").toStringRef();
  double value = 0.0;
  if (json_number_at(json, {"units", "lammps_real", "kcal_per_mol_per_ev"}, value)) {
    kcal_per_mol_per_ev = value;
    kcal_source = "units.lammps_real.kcal_per_mol_per_ev";
  } else if (json_number_at(json, {"units", "openmm", "kj_per_mol_per_ev"}, value)) {
    // Files exported before the lammps_real entry existed carry only OpenMM's kJ/mol factor.
    // 1 kcal = 4.184 kJ exactly (the thermochemical calorie, by definition; it is also the
    // kcal of LAMMPS' units real), so dividing by 4.184 adds no second physical constant and
    // such files need no re-export.
    kcal_per_mol_per_ev = value / 4.184;
    kcal_source = "units.openmm.kj_per_mol_per_ev / 4.184";
  } else {
    return;
  }
  // 1 eV = 23.06 kcal/mol; anything far from it is a damaged or hand-edited metadata record
  if (!(kcal_per_mol_per_ev > 20.0 && kcal_per_mol_per_ev < 26.0))
    error->all(FLERR,
               "pair_coeff for transip: model file '{}' gives {} = {} kcal/mol per eV in its "
               "metadata, far from 23.06; the metadata is damaged: re-export the model with "
               "python -m transip_md.export",
               model_path, kcal_source, kcal_per_mol_per_ev);
}

// energy_unit for this input's unit style (checked by check_units_style).
void PairTransIP::set_energy_unit()
{
  if (strcmp(update->unit_style, "metal") == 0) {
    energy_unit = 1.0;
    return;
  }
  if (!(kcal_per_mol_per_ev > 0.0))
    error->all(FLERR,
               "pair_style transip with 'units real' needs the eV -> kcal/mol factor from the "
               "model file, but the metadata_json of '{}' has neither "
               "units.lammps_real.kcal_per_mol_per_ev nor units.openmm.kj_per_mol_per_ev (not "
               "written by the exporter?). Re-export it with python -m transip_md.export, or "
               "use units metal",
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
  std::vector<std::string> supported = model_elements;
  int mapped = 0;
  for (int t = 1; t <= ntypes; ++t) {
    const std::string sym = arg[2 + t];
    if (sym == "NULL") {
      type_to_z[t] = 0;
      type_symbol[t] = "NULL";
      continue;
    }
    const int z = symbol_to_z(sym);
    if (z == 0) {
      const std::string hint = case_insensitive_symbol(sym);
      if (!hint.empty())
        error->all(FLERR,
                   "pair_coeff for transip: '{}' (type {}) is not a chemical element symbol; "
                   "did you mean '{}'? Symbols are case sensitive",
                   sym, t, hint);
      error->all(FLERR,
                 "pair_coeff for transip: '{}' (type {}) is not a chemical element symbol "
                 "(use NULL to leave a type to another pair style)",
                 sym, t);
    }
    bool known = false;
    for (const auto &s : supported)
      if (s == sym) known = true;
    if (!known)
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
    std::string mesg = fmt::format(
        "TransIP model {}\n  format_version {}, {}, cutoff {} Å, {} layers, receptive field "
        "{} Å, device {}\n  elements in the model: {}\n  charge {} e, multiplicity {}\n  "
        "{}\n  type map:\n",
        model_path, format_version, dtype_name(model_dtype), model_cutoff, num_layers,
        receptive_field, device.str(), join(supported, " "), total_charge, multiplicity,
        energy_unit == 1.0
            ? std::string("units metal: the model's eV and Å as they are")
            : fmt::format("units {}: energies, forces and virial x {:.12g} kcal/mol per eV ({} "
                          "of the model file); positions in Å",
                          update->unit_style, energy_unit, kcal_source));
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

void PairTransIP::load_model(const std::string &path)
{
  model_path = path;
  {
    FILE *fp = fopen(path.c_str(), "rb");
    if (!fp)
      error->all(FLERR, "pair_coeff for transip: cannot open model file '{}': {}", path,
                 utils::getsyserror());
    fclose(fp);
  }

  // files torch::jit::load would refuse with an obscure message (a training checkpoint gets
  // "constants.pkl not found"): say what they are
  all_agree_or_fail(archive_problem(path));

  std::string failure;
  std::unique_ptr<torch::jit::Module> loaded;
  try {
    loaded = std::make_unique<torch::jit::Module>(torch::jit::load(path, device));
  } catch (const c10::Error &e) {
    failure = fmt::format(
        "pair_coeff for transip: '{}' is not a loadable TorchScript model file (corrupt, "
        "truncated, or not written by torch.jit.save / transip-md-export): {}",
        path, last_line_of(e.what_without_backtrace()));
  } catch (const std::exception &e) {
    failure = fmt::format("pair_coeff for transip: cannot load model file '{}': {}", path,
                          last_line_of(e.what()));
  }
  all_agree_or_fail(failure);

  torch::jit::Module &m = *loaded;
  for (const char *name : {"format_version", "cutoff", "num_layers", "receptive_field"})
    if (!m.hasattr(name))
      error->all(FLERR,
                 "pair_coeff for transip: '{}' is a TorchScript file but not a TransIP model "
                 "(it has no '{}' attribute)",
                 path, name);
  if (!m.find_method("lammps") || !m.find_method("element_list"))
    error->all(FLERR,
               "pair_coeff for transip: '{}' is a TorchScript file but not a TransIP model "
               "(no lammps()/element_list() method)",
               path);

  has_periodic_entry = m.find_method("lammps_periodic").has_value();
  has_electron_check = m.find_method("validate_electrons").has_value();
  electron_warning_given = false;
  has_halo_entry = true;
  for (const char *name :
       {"halo_feature_width", "halo_edges", "halo_embed", "halo_layer", "halo_readout"})
    if (!m.find_method(name)) has_halo_entry = false;
  format_version = m.attr("format_version").toInt();
  if (format_version < 1)
    error->all(FLERR,
               "pair_coeff for transip: '{}' has format_version {}: it is a scripted model "
               "but not an exported one; export it with transip-md-export (python -m "
               "transip_md.export)",
               path, format_version);
  if (format_version > SUPPORTED_FORMAT_VERSION)
    error->all(FLERR,
               "pair_coeff for transip: '{}' has format_version {} but this plugin reads "
               "format_version <= {}; rebuild the plugin from the transip-md that exported "
               "the model (python -m transip_md.lammps build)",
               path, format_version, SUPPORTED_FORMAT_VERSION);

  model_cutoff = m.attr("cutoff").toDouble();
  num_layers = m.attr("num_layers").toInt();
  receptive_field = m.attr("receptive_field").toDouble();
  if (!(model_cutoff > 0.0) || num_layers < 1 || receptive_field < model_cutoff)
    error->all(FLERR,
               "pair_coeff for transip: '{}' declares an invalid range (cutoff {} Å, {} "
               "layers, receptive field {} Å)",
               path, model_cutoff, num_layers, receptive_field);

  model_elements.clear();
  try {
    const c10::IValue symbols = m.run_method("element_list");
    for (const auto &item : symbols.toListRef()) model_elements.push_back(item.toStringRef());
  } catch (const std::exception &e) {
    error->all(FLERR, "pair_coeff for transip: element_list() of '{}' failed: {}", path,
               last_line_of(e.what()));
  }
  if (model_elements.empty())
    error->all(FLERR, "pair_coeff for transip: model '{}' supports no elements", path);

  model_dtype = torch::kFloat64;
  for (const auto &p : m.parameters()) {
    model_dtype = p.scalar_type();
    break;
  }
  feature_width = 0;
  if (has_halo_entry) {
    try {
      feature_width = m.run_method("halo_feature_width").toInt();
    } catch (const std::exception &e) {
      error->all(FLERR, "pair_coeff for transip: halo_feature_width() of '{}' failed: {}", path,
                 last_line_of(e.what()));
    }
    if (feature_width < 1 || feature_width > 65536)
      error->all(FLERR, "pair_coeff for transip: '{}' declares {} features per atom", path,
                 feature_width);
  }
  m.eval();
  model = std::move(loaded);
  read_unit_conversion();
}

/* ----------------------------------------------------------------------
   What a file given to pair_coeff is, when it is not a TorchScript archive: "" for a zip
   with TorchScript code (or metadata) in it, which torch::jit::load then reads; else the
   message to stop with. A TorchScript archive holds <root>/code/..., <root>/constants.pkl and
   <root>/data.pkl; torch.save() writes <root>/data.pkl and <root>/data/<n> only, and a
   transip-md training checkpoint pickles its kind string, stored uncompressed in data.pkl.
------------------------------------------------------------------------- */

std::string PairTransIP::archive_problem(const std::string &path)
{
  std::FILE *fp = std::fopen(path.c_str(), "rb");
  if (!fp) return fmt::format("pair_coeff for transip: cannot open model file '{}'", path);
  std::vector<ZipEntry> entries;
  const ZipStatus status = read_zip_directory(fp, entries);
  std::string problem;
  if (status == ZipStatus::NOT_ZIP) {
    problem = fmt::format(
        "pair_coeff for transip: '{}' is not a TorchScript archive (not a zip file at all: "
        "truncated or corrupt? or another kind of file). pair_coeff needs a model file "
        "exported with python -m transip_md.export",
        path);
  } else if (status == ZipStatus::DAMAGED) {
    problem = fmt::format(
        "pair_coeff for transip: '{}' is not a loadable TorchScript archive: its zip directory "
        "is missing or damaged (truncated or corrupt? an interrupted copy or download); copy "
        "or export it again",
        path);
  } else {
    bool torchscript = false;
    const ZipEntry *pickle = nullptr;
    for (const ZipEntry &e : entries) {
      if (e.name.find("/code/") != std::string::npos || ends_with(e.name, "/constants.pkl") ||
          ends_with(e.name, "/extra/metadata.json"))
        torchscript = true;
      if (ends_with(e.name, "/data.pkl") && e.name.find('/') == e.name.size() - 9)
        pickle = &e;
    }
    if (torchscript) {
      problem = "";
    } else if (pickle && zip_entry_contains(fp, *pickle, "transip-md-checkpoint")) {
      problem = fmt::format(
          "pair_coeff for transip: '{}' is a transip-md training checkpoint, not an exported "
          "model: export it first with python -m transip_md.export {} model.pt",
          path, path);
    } else if (pickle) {
      problem = fmt::format(
          "pair_coeff for transip: '{}' is a torch.save() file (pickled tensors or a state "
          "dict), not an exported TorchScript model; pair_coeff needs a file written by python "
          "-m transip_md.export (a transip-md checkpoint is exported with python -m "
          "transip_md.export CHECKPOINT model.pt)",
          path);
    } else {
      problem = fmt::format(
          "pair_coeff for transip: '{}' is a zip file but not a TorchScript archive (no "
          "code/ or data.pkl entries); pair_coeff needs a model file exported with python -m "
          "transip_md.export",
          path);
    }
  }
  std::fclose(fp);
  return problem;
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
  const bool can_map = comm->nprocs == 1 && atom->tag_enable && has_periodic_entry;
  if (ghost_request == "map" && !can_map)
    error->all(FLERR,
               "pair_style transip ghosts map needs one MPI rank, atom IDs and a model file "
               "with lammps_periodic() (this run: {} ranks, atom IDs {}, entry {}); use "
               "ghosts halo, shell or auto",
               comm->nprocs, atom->tag_enable ? "on" : "off",
               has_periodic_entry ? "present" : "missing");
  if (ghost_request == "halo" && !has_halo_entry)
    error->all(FLERR,
               "pair_style transip ghosts halo needs a model file with the halo entry points "
               "(halo_edges, halo_embed, halo_layer, halo_readout: format_version 2); '{}' has "
               "format_version {} without them. Re-export it with this transip-md "
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
  // one layer's autograd graph at a time inside lammps_periodic).
  const bool has_low_memory = model->hasattr("low_memory");
  if (ghost_mode == GHOSTS_MAP && recompute && !has_low_memory)
    error->all(FLERR,
               "pair_style transip recompute yes with ghosts map needs a model file with the "
               "low_memory attribute; re-export '{}' with this transip-md "
               "(python -m transip_md.export)",
               model_path);
  if (has_low_memory) model->setattr("low_memory", ghost_mode == GHOSTS_MAP && recompute);

  if (ghost_mode == GHOSTS_MAP) {
    no_virial_fdotr_compute = 1;    // the model returns the virial of the mapped edges
    neighbor->add_request(this, NeighConst::REQ_FULL);
    if (comm->me == 0)
      utils::logmesg(lmp,
                     "TransIP: one rank: periodic ghosts mapped to their owned atoms; the "
                     "model runs on owned atoms only (ghost cutoff {:.4g} Å = cutoff + skin){}\n",
                     model_cutoff + neighbor->skin,
                     recompute ? "; recompute yes: the model keeps one layer's autograd graph "
                                 "at a time (less memory, more time)"
                               : "");
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
    if (z <= 0 || z > MAX_Z || !atom->mass_setflag[t]) continue;
    const double mass = atom->mass[t], standard = STANDARD_MASSES[z];
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
  std::string reason = model_refusal(
      "validate", {torch::zeros({1, 3}, torch::TensorOptions().dtype(model_dtype)).to(device),
                   torch::full({1}, probe_z, i64).to(device),
                   torch::scalar_tensor(total_charge, i64).to(device),
                   torch::scalar_tensor(multiplicity, i64).to(device)});
  if (!reason.empty())
    error->all(FLERR, fmt::format("pair_style transip: charge {} / multiplicity {} (pair_style "
                                  "keywords): {}. Choose values the model was trained for",
                                  total_charge, multiplicity, reason));

  if (!has_electron_check) {
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
  reason = model_refusal("validate_electrons",
                         {static_cast<int64_t>(all[0]), total_charge, multiplicity,
                          static_cast<int64_t>(all[1])});
  if (!reason.empty())
    error->all(FLERR,
               fmt::format("pair_style transip: charge {} and multiplicity {} are impossible for "
                           "this system: {}. Set charge and multiplicity on the pair_style "
                           "transip line to the system's real state",
                           total_charge, multiplicity, reason));
}

// Runs one of the model's checking methods; "" if it passed (or the file lacks it, or has it
// with other arguments), else the reason it raised, without the traceback and the
// "ValueError: " prefix.
std::string PairTransIP::model_refusal(const std::string &method, std::vector<c10::IValue> args)
{
  const auto found = model->find_method(method);
  if (!found || found->function().getSchema().arguments().size() != args.size() + 1) return "";
  std::string reason;
  try {
    model->get_method(method)(std::move(args));
  } catch (const c10::Error &e) {
    reason = last_line_of(e.what_without_backtrace());
  } catch (const std::exception &e) {
    reason = last_line_of(e.what());
  }
  const std::string prefix = "ValueError: ";
  if (reason.compare(0, prefix.size(), prefix) == 0) reason = reason.substr(prefix.size());
  return reason;
}

/* ----------------------------------------------------------------------
   A periodic box much smaller than the cutoff: every atom meets hundreds of
   periodic images of itself and LAMMPS would stop with "Neighbor list
   overflow, boost neigh_modify one". Say what is wrong instead. Boxes a bit
   thinner than the cutoff are fine (images become more neighbours).
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
  // the Python model refuses cells needing more than 64 image layers per axis (units mistake)
  for (int k = 0; k < 3; ++k)
    if (periodic[k] && face[k] * 64.0 < model_cutoff)
      error->all(FLERR,
                 "pair_style transip: the periodic box ({}) is too thin along {}: {:.4g} Å "
                 "between faces for a model cutoff of {:.4g} Å (more than 64 periodic images "
                 "per axis); check the box size and units",
                 box, axis[k], face[k], model_cutoff);
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

// The model names atoms by their row in its input (owned atoms first, then
// ghosts); translate those to LAMMPS atom IDs for the user.
std::string PairTransIP::rows_to_ids(const std::string &message) const
{
  static const std::regex atom_rows("atoms? (?:index )?([0-9]+)(?: and ([0-9]+))?");
  std::smatch m;
  if (!std::regex_search(message, m, atom_rows)) return "";
  std::string out;
  for (int g = 1; g <= 2; ++g) {
    if (!m[g].matched) continue;
    const long row = std::stol(m[g].str());
    if (row < 0 || row >= static_cast<long>(row_to_atom.size())) continue;
    const int i = row_to_atom[row];
    out += fmt::format("{}row {} = atom ID {}{}", out.empty() ? "" : ", ", row,
                       atom->tag_enable ? std::to_string(atom->tag[i]) : std::string("?"),
                       i < atom->nlocal ? "" : " (ghost image)");
  }
  return out.empty() ? out : " [" + out + "]";
}

[[noreturn]] void PairTransIP::model_failed(const std::string &what)
{
  const std::string reason = last_line_of(what);
  error->one(FLERR, "pair_style transip: the model failed at step {}: {}{}", update->ntimestep,
             reason, rows_to_ids(reason));
}

void PairTransIP::compute(int eflag, int vflag)
{
  ev_init(eflag, vflag);
  if (vflag_atom || cvflag_atom)
    error->all(FLERR,
               "pair_style transip does not provide per-atom virials (compute stress/atom, "
               "compute centroid/stress/atom); the global virial/pressure is available");

  if (ghost_mode == GHOSTS_MAP) {
    compute_owner_mapped();
    return;
  }
  if (ghost_mode == GHOSTS_HALO) {
    compute_halo();
    return;
  }

  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  double **x = atom->x;
  const int *type = atom->type;

  const double cutsq_model = model_cutoff * model_cutoff;
  const int ncentres = list->inum + list->gnum;
  const int *ilist = list->ilist;
  const int *numneigh = list->numneigh;
  int **firstneigh = list->firstneigh;
  const bool pruning = prune && can_prune();
  const int64_t nlayers = num_layers;

  // ---- which atoms the model needs. Without pruning: every mapped owned or
  // ghost atom. With pruning: the energy of an owned atom after L layers
  // depends on atoms at most L edges (each < cutoff) away, and only atoms at
  // most L-1 edges away need neighbours of their own; a breadth-first search
  // over the neighbour list finds them, so the rest of the ghost shell (kept
  // for the skin) costs nothing in the model. The result is identical.
  centre_in_list.assign(nall, 0);
  for (int ii = 0; ii < ncentres; ++ii) centre_in_list[ilist[ii]] = 1;
  if (pruning) {
    hops.assign(nall, INT_MAX);
    frontier.clear();
    for (int i = 0; i < nlocal; ++i)
      if (type_to_z[type[i]] > 0) {
        hops[i] = 0;
        frontier.push_back(i);
      }
    for (int level = 0; level < nlayers && !frontier.empty(); ++level) {
      next_frontier.clear();
      for (const int i : frontier) {
        if (!centre_in_list[i]) continue;
        const int *jlist = firstneigh[i];
        for (int jj = 0; jj < numneigh[i]; ++jj) {
          const int j = jlist[jj] & NEIGHMASK;
          if (hops[j] <= level + 1 || type_to_z[type[j]] <= 0) continue;
          const double dx = x[j][0] - x[i][0];
          const double dy = x[j][1] - x[i][1];
          const double dz = x[j][2] - x[i][2];
          if (dx * dx + dy * dy + dz * dz >= cutsq_model) continue;
          hops[j] = level + 1;
          next_frontier.push_back(j);
        }
      }
      frontier.swap(next_frontier);
    }
  }

  // ---- rows: needed atoms in LAMMPS order, so owned atoms come first
  atom_to_row.assign(nall, -1);
  row_to_atom.clear();
  pos_buf.clear();
  z_buf.clear();
  int nlocal_rows = 0;
  for (int i = 0; i < nall; ++i) {
    const int64_t z = type_to_z[type[i]];
    if (z <= 0) continue;
    if (pruning && hops[i] > nlayers) continue;
    atom_to_row[i] = static_cast<int>(row_to_atom.size());
    row_to_atom.push_back(i);
    pos_buf.push_back(x[i][0]);
    pos_buf.push_back(x[i][1]);
    pos_buf.push_back(x[i][2]);
    z_buf.push_back(z);
    if (i < nlocal) ++nlocal_rows;
  }
  const int64_t nrows = static_cast<int64_t>(row_to_atom.size());

  // ---- directed edges (centre, neighbour) within the model cutoff
  edge_i_buf.clear();
  edge_j_buf.clear();
  for (int ii = 0; ii < ncentres; ++ii) {
    const int i = ilist[ii];
    const int ri = atom_to_row[i];
    if (ri < 0) continue;
    if (pruning && hops[i] >= nlayers) continue;
    const int *jlist = firstneigh[i];
    const int jnum = numneigh[i];
    for (int jj = 0; jj < jnum; ++jj) {
      const int j = jlist[jj] & NEIGHMASK;
      const int rj = atom_to_row[j];
      if (rj < 0) continue;
      const double dx = x[j][0] - x[i][0];
      const double dy = x[j][1] - x[i][1];
      const double dz = x[j][2] - x[i][2];
      if (dx * dx + dy * dy + dz * dz >= cutsq_model) continue;
      edge_i_buf.push_back(ri);
      edge_j_buf.push_back(rj);
    }
  }
  const int64_t nedges = static_cast<int64_t>(edge_i_buf.size());

  if (report_load) report_model_load(nlocal_rows, nrows, nedges,
                                      pruning ? ", the rest cannot reach owned atoms" : "");

  // An empty subdomain (or one holding only NULL-type atoms) has no energy
  // of its own; its ghosts' forces come from the ranks that own neighbours.
  if (nlocal_rows > 0) {
    torch::Tensor energies, forces;
    try {
      const ModelInputs in = model_inputs(nrows, nedges);
      const torch::Tensor &pos = in.pos, &numbers = in.numbers, &ei = in.edge_i,
                          &ej = in.edge_j, &q = in.charge, &s = in.spin;
      // The profiling graph executor re-specialises on every new neighbour count;
      // that costs more than it gains (measured 17-40% slower on the CPU, 1.45x
      // slower on an H100), so it is off unless asked for. Thread-local, restored.
      const bool optimize = jit_optimize == 1;    // default off: faster on CPU and on the H100
      torch::jit::GraphOptimizerEnabledGuard jit_guard(optimize);
      auto out = model->get_method("lammps")(
          {pos, numbers, ei, ej, static_cast<int64_t>(nlocal_rows), q, s});
      auto result = out.toTuple();
      energies = result->elements().at(0).toTensor().to(torch::kCPU, torch::kFloat64).contiguous();
      forces = result->elements().at(1).toTensor().to(torch::kCPU, torch::kFloat64).contiguous();
    } catch (const c10::Error &e) {
      model_failed(e.what_without_backtrace());
    } catch (const std::exception &e) {
      model_failed(e.what());
    }
    if (energies.dim() != 1 || energies.size(0) != nlocal_rows || forces.dim() != 2 ||
        forces.size(0) != nrows || forces.size(1) != 3)
    {
      std::ostringstream got;
      got << "lammps() returned energies of shape " << energies.sizes() << " and forces of shape "
          << forces.sizes() << ", expected [" << nlocal_rows << "] and [" << nrows << ", 3]";
      model_failed(got.str());
    }

    add_model_results(forces.data_ptr<double>(), nrows, energies.data_ptr<double>(), nlocal_rows);
  }

  if (vflag_fdotr) virial_fdotr_compute();
}

/* ----------------------------------------------------------------------
   Halo mode (any number of ranks; ghosts only to cutoff + skin).

   Rows: the owned atoms of mapped types (LAMMPS order), then the ghosts that
   are their neighbours within the cutoff. The model's halo_* methods run the
   network in pieces; between layers the plugin exchanges features:

   forward   pos (leaf) -> halo_edges -> nbr_index, edge, envelope (made leaves)
             h0 = halo_embed(all rows)
             layer l: out_l = halo_layer(l, h_l, ...) on owned rows
                      h_{l+1}: owned rows = out_l, ghost rows = their owners'
                      out_l, through comm->forward_comm(this)
             energies = halo_readout(out_{L-1})
   backward  g = dE/d out_{L-1}; for l = L-1 .. 0:
               autograd: d/d(h_l, edge, envelope) of out_l with weights g
               accumulate d/d(edge, envelope); the ghost rows of d/dh_l go to
               their owners (comm->reverse_comm(this)) and are added to the
               owned rows: that is g for out_{l-1}
             forces = -d/dpos of (edge, envelope) weighted by the accumulated
             gradients, on owned and ghost rows; LAMMPS' reverse communication
             of forces (newton on) sums ghost forces into their owners, and
             virial_fdotr_compute() gives the virial.
   Every rank takes part in every exchange (L-1 forward, L-1 reverse), also
   ranks that own no atom of a mapped type. Features travel as doubles in
   LAMMPS' buffers.

   Exchange cost: on a GPU, copying whole [rows, W] matrices device <-> host
   in every layer costs far more than the layers themselves, so only the
   rows LAMMPS communicates cross: forward, the owned atoms it sends
   ("border" atoms, gathered on the device into border_feat) and the ghost
   rows it fills (ghost_feat, one copy to the device); backward, the ghost
   rows' gradients and the sums received for border atoms. Which atoms
   LAMMPS sends is learnt from pack_forward_comm itself (no Comm internals):
   the set is restarted whenever the neighbour lists were rebuilt (atoms
   renumbered), an exchange that meets an atom outside it reads a host copy
   of all owned rows and adds the atom. Host blocks hold the model's dtype
   (float32 or float64; converted to double only in pack/unpack); received
   gradients are summed in double, as before, so the numbers are unchanged.

   recompute yes: the forward pass (edges, layers) runs without autograd
   graphs, keeping only each layer's input features; the backward pass
   re-runs layer l with autograd just before differentiating it, and the
   edge features at the end, so that one graph at a time is alive. Same
   numbers, about one more forward pass of time, a fraction of the memory.
------------------------------------------------------------------------- */

void PairTransIP::compute_halo()
{
  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  double **x = atom->x;
  const int *type = atom->type;
  const double cutsq_model = model_cutoff * model_cutoff;
  const int64_t W = feature_width;
  const int nlayers = static_cast<int>(num_layers);

  // ---- rows: owned atoms, then ghosts that are neighbours of owned atoms
  atom_to_row.assign(nall, -1);
  row_to_atom.clear();
  pos_buf.clear();
  z_buf.clear();
  auto add_row = [&](int i, int64_t z) {
    atom_to_row[i] = static_cast<int>(row_to_atom.size());
    row_to_atom.push_back(i);
    pos_buf.push_back(x[i][0]);
    pos_buf.push_back(x[i][1]);
    pos_buf.push_back(x[i][2]);
    z_buf.push_back(z);
  };
  for (int i = 0; i < nlocal; ++i) {
    const int64_t z = type_to_z[type[i]];
    if (z > 0) add_row(i, z);
  }
  const int64_t nlocal_rows = static_cast<int64_t>(row_to_atom.size());
  edge_i_buf.clear();
  edge_j_buf.clear();
  for (int ii = 0; ii < list->inum; ++ii) {
    const int i = list->ilist[ii];
    const int ri = atom_to_row[i];
    if (ri < 0) continue;
    const int *jlist = list->firstneigh[i];
    for (int jj = 0; jj < list->numneigh[i]; ++jj) {
      const int j = jlist[jj] & NEIGHMASK;
      const int64_t zj = type_to_z[type[j]];
      if (zj <= 0) continue;
      const double dx = x[j][0] - x[i][0];
      const double dy = x[j][1] - x[i][1];
      const double dz = x[j][2] - x[i][2];
      if (dx * dx + dy * dy + dz * dz >= cutsq_model) continue;
      if (atom_to_row[j] < 0) add_row(j, zj);
      edge_i_buf.push_back(ri);
      edge_j_buf.push_back(atom_to_row[j]);
    }
  }
  const int64_t nrows = static_cast<int64_t>(row_to_atom.size());
  const int64_t nedges = static_cast<int64_t>(edge_i_buf.size());

  // ---- exchange bookkeeping: ghost rows of the model first in ghost_feat (they go to the
  // device as one block), the other ghosts after them (they only pass through this rank)
  halo_dtype = model_dtype == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  halo_nlocal_rows = nlocal_rows;
  ghost_slot.resize(atom->nghost);
  int other_ghosts = static_cast<int>(nrows - nlocal_rows);
  for (int i = nlocal; i < nall; ++i)
    ghost_slot[i - nlocal] = atom_to_row[i] >= 0 ? static_cast<int>(atom_to_row[i] - nlocal_rows)
                                                 : other_ghosts++;
  if (neighbor->ncalls != border_ncalls || nlocal != border_nlocal ||
      atom->nghost != border_nghost) {    // atoms renumbered: learn the border atoms anew
    border_atoms.clear();
    border_ncalls = neighbor->ncalls;
    border_nlocal = nlocal;
    border_nghost = atom->nghost;
  }
  index_border_atoms();    // model rows change every step

  if (report_load)
    report_model_load(nlocal_rows, nrows, nedges, "; halo exchange: layers run on owned atoms only");

  // A rank without owned atoms of mapped types runs no model but still takes part in every
  // exchange (its ghosts' features pass through it on multi-hop routes).
  const bool active = nlocal_rows > 0;
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  const bool optimize = jit_optimize == 1;    // default off: faster on CPU and on the H100
  torch::jit::GraphOptimizerEnabledGuard jit_guard(optimize);

  torch::Tensor pos, numbers, q, s, nbr_index, edge, envelope, edge_leaf, env_leaf, h;
  std::vector<torch::Tensor> h_in(nlayers), out(nlayers);
  std::vector<c10::IValue> edge_args;
  auto run_layer = [&](int l, const torch::Tensor &features) {
    return model->get_method("halo_layer")(
                    {static_cast<int64_t>(l), features, nbr_index, edge_leaf, env_leaf})
        .toTensor();
  };

  // turn exceptions from the model into a LAMMPS error on this rank (MPI_Abort)
  auto guarded = [&](auto &&fn) {
    try {
      fn();
    } catch (const c10::Error &e) {
      model_failed(e.what_without_backtrace());
    } catch (const std::exception &e) {
      model_failed(e.what());
    }
  };

  if (active) {
    guarded([&] {
      const ModelInputs in = model_inputs(nrows, nedges);
      pos = in.pos;
      numbers = in.numbers;
      const torch::Tensor &ei = in.edge_i, &ej = in.edge_j;
      q = in.charge;
      s = in.spin;
      pos = pos.detach().requires_grad_(!recompute);
      edge_args = {pos, numbers, ei, ej, nlocal_rows, q, s};
      c10::intrusive_ptr<c10::ivalue::Tuple> res;
      {
        c10::AutoGradMode grad_mode(!recompute);
        res = model->get_method("halo_edges")(edge_args).toTuple();
      }
      nbr_index = res->elements().at(0).toTensor();
      edge = res->elements().at(1).toTensor();
      envelope = res->elements().at(2).toTensor();
      if (nbr_index.dim() != 2 || nbr_index.size(0) != nlocal_rows)
        throw std::runtime_error("halo_edges() returned a neighbour index of unexpected shape");
      edge_leaf = edge.detach().requires_grad_(true);
      env_leaf = envelope.detach().requires_grad_(true);
      h = model->get_method("halo_embed")({numbers, q, s}).toTensor();
      if (h.dim() != 2 || h.size(0) != nrows || h.size(1) != W)
        throw std::runtime_error("halo_embed() returned features of unexpected shape");
    });
  }

  // ---- forward, layer by layer
  for (int l = 0; l < nlayers; ++l) {
    if (active) {
      guarded([&] {
        c10::AutoGradMode grad_mode(!recompute);
        h_in[l] = h.detach().requires_grad_(l > 0 && !recompute);
        out[l] = run_layer(l, h_in[l]);
        if (out[l].dim() != 2 || out[l].size(0) != nlocal_rows || out[l].size(1) != W)
          throw std::runtime_error("halo_layer() returned features of unexpected shape");
      });
    }
    if (l + 1 == nlayers) break;
    send_features(active ? out[l].detach() : torch::Tensor());
    if (active) {
      guarded([&] { h = torch::cat({out[l].detach(), ghost_rows_to_device()}); });
      if (recompute) out[l] = torch::Tensor();    // re-run in the backward pass
    }
  }

  torch::Tensor energies;
  auto readout = [&] {
    energies = model->get_method("halo_readout")({out[nlayers - 1], numbers.narrow(0, 0,
                                                                             nlocal_rows)})
                   .toTensor();
    if (energies.dim() != 1 || energies.size(0) != nlocal_rows)
      throw std::runtime_error("halo_readout() returned energies of unexpected shape");
  };
  if (active && !recompute) guarded(readout);

  // ---- backward, layer by layer
  torch::Tensor g_out, g_edge, g_env;
  for (int l = nlayers - 1; l >= 0; --l) {
    torch::Tensor g_h;
    if (active) {
      guarded([&] {
        if (recompute) {    // this layer's graph, now
          h_in[l] = h_in[l].detach().requires_grad_(l > 0);
          out[l] = run_layer(l, h_in[l]);
          if (l == nlayers - 1) readout();
        }
        std::vector<torch::Tensor> inputs = {edge_leaf, env_leaf};
        if (l > 0) inputs.push_back(h_in[l]);
        std::vector<torch::Tensor> outputs, weights;
        if (l == nlayers - 1) {
          outputs.push_back(energies.sum());
        } else {
          outputs.push_back(out[l]);
          weights.push_back(g_out);
        }
        auto grads = torch::autograd::grad(outputs, inputs, weights, false, false, true);
        for (int k = 0; k < 2; ++k) {
          if (!grads[k].defined()) continue;
          torch::Tensor &acc = k == 0 ? g_edge : g_env;
          acc = acc.defined() ? acc + grads[k] : grads[k];
        }
        if (l > 0) g_h = grads[2].defined() ? grads[2] : torch::zeros_like(h_in[l]);
        h_in[l] = torch::Tensor();
        out[l] = torch::Tensor();
      });
    }
    if (l == 0) break;
    // gradients that ghost rows received go to the owners of those atoms
    g_out = return_ghost_gradients(active ? g_h.detach() : torch::Tensor());
  }

  if (active) {
    torch::Tensor forces, e_cpu;
    guarded([&] {
      if (recompute) {    // the edge features' graph, now
        pos.requires_grad_(true);
        edge_args[0] = pos;
        auto res = model->get_method("halo_edges")(edge_args).toTuple();
        edge = res->elements().at(1).toTensor();
        envelope = res->elements().at(2).toTensor();
      }
      std::vector<torch::Tensor> outputs, weights;
      if (g_edge.defined() && edge.requires_grad()) {
        outputs.push_back(edge);
        weights.push_back(g_edge);
      }
      if (g_env.defined() && envelope.requires_grad()) {
        outputs.push_back(envelope);
        weights.push_back(g_env);
      }
      torch::Tensor g_pos;
      if (!outputs.empty())
        g_pos = torch::autograd::grad(outputs, {pos}, weights, false, false, true)[0];
      forces = g_pos.defined() ? (-g_pos).to(torch::kCPU, torch::kFloat64).contiguous()
                               : torch::zeros({nrows, 3}, f64);
      e_cpu = energies.detach().to(torch::kCPU, torch::kFloat64).contiguous();
    });
    add_model_results(forces.data_ptr<double>(), nrows, e_cpu.data_ptr<double>(), nlocal_rows);
  }
  if (vflag_fdotr) virial_fdotr_compute();
}

/* ----------------------------------------------------------------------
   Halo exchange helpers. Slots: border_atoms lists the atoms that LAMMPS'
   forward communication packs (owned or ghost), owned atoms with model rows
   first, in row order (their rows are border_rows / border_index); for those
   atoms border_feat holds the features to send and border_grad the
   gradients received, by slot.
------------------------------------------------------------------------- */

namespace {

// row `row` of a contiguous [*, W] host block of float or double, as doubles
void load_row(const torch::Tensor &block, int64_t row, double *dst)
{
  const int64_t W = block.size(1);
  if (block.scalar_type() == torch::kFloat32) {
    const float *src = block.data_ptr<float>() + row * W;
    std::copy(src, src + W, dst);
  } else {
    const double *src = block.data_ptr<double>() + row * W;
    std::copy(src, src + W, dst);
  }
}

void store_row(const double *src, torch::Tensor &block, int64_t row)
{
  const int64_t W = block.size(1);
  if (block.scalar_type() == torch::kFloat32)
    std::copy(src, src + W, block.data_ptr<float>() + row * W);
  else
    std::copy(src, src + W, block.data_ptr<double>() + row * W);
}

}    // namespace

// The first `rows` rows of a kept host block [capacity, W] (pinned for CUDA), grown as needed.
torch::Tensor PairTransIP::host_rows(torch::Tensor &block, int64_t rows, torch::Dtype dtype)
{
  const int64_t W = feature_width;
  if (!block.defined() || block.size(0) < rows || block.size(1) != W ||
      block.scalar_type() != dtype) {
    auto options = torch::TensorOptions().dtype(dtype);
    if (device.is_cuda()) options = options.pinned_memory(true);
    block = torch::empty({std::max<int64_t>(rows + rows / 8, 1), W}, options);
  }
  return block.narrow(0, 0, rows);
}

// Slots of border_atoms (see above): each step (model rows change) and when atoms were added.
void PairTransIP::index_border_atoms()
{
  const int nlocal = atom->nlocal;
  std::sort(border_atoms.begin(), border_atoms.end());
  border_atoms.erase(std::unique(border_atoms.begin(), border_atoms.end()), border_atoms.end());
  std::stable_partition(border_atoms.begin(), border_atoms.end(),
                        [&](int i) { return i < nlocal && atom_to_row[i] >= 0; });
  border_slot.assign(nlocal + atom->nghost, -1);
  border_rows.clear();
  for (size_t k = 0; k < border_atoms.size(); ++k) {
    const int i = border_atoms[k];
    border_slot[i] = static_cast<int>(k);
    if (i < nlocal && atom_to_row[i] >= 0) border_rows.push_back(atom_to_row[i]);
  }
  const auto rows = torch::from_blob(border_rows.data(), {int64_t(border_rows.size())},
                                     torch::TensorOptions().dtype(torch::kInt64));
  border_index = device.is_cuda() ? rows.to(device) : rows.clone();
}

// border_feat = the rows of halo_out that LAMMPS will send: gathered on the device, one copy.
void PairTransIP::gather_border_rows()
{
  const int64_t n = static_cast<int64_t>(border_rows.size());
  if (!halo_out.defined() || n == 0) return;
  torch::Tensor block = host_rows(border_feat, n, halo_dtype);
  if (halo_out.is_cpu() && halo_out.scalar_type() == halo_dtype)
    torch::index_select_out(block, halo_out, 0, border_index);
  else
    block.copy_(halo_out.index_select(0, border_index));
}

// All owned rows of halo_out on the host, for atoms not (yet) in border_atoms: once after each
// reneighbouring, while the border atoms are learnt.
const torch::Tensor &PairTransIP::all_local_rows()
{
  if (!halo_all_local.defined())
    halo_all_local = halo_out.to(torch::kCPU, halo_dtype).contiguous();
  return halo_all_local;
}

// Forward communication of one layer's output (owned rows; undefined on a rank without them).
void PairTransIP::send_features(const torch::Tensor &out_l)
{
  try {
    halo_out = out_l;
    gather_border_rows();
    host_rows(ghost_feat, atom->nghost, halo_dtype);
  } catch (const std::exception &e) {
    error->one(FLERR, "pair_style transip: halo exchange failed at step {}: {}",
               update->ntimestep, last_line_of(e.what()));
  }
  border_new.clear();
  comm->forward_comm(this);
  halo_out = torch::Tensor();
  halo_all_local = torch::Tensor();
  if (!border_new.empty()) {    // learnt new border atoms: slots for them, before the next use
    border_atoms.insert(border_atoms.end(), border_new.begin(), border_new.end());
    index_border_atoms();
  }
}

// The model's ghost rows (first rows of ghost_feat) on the device, in one copy.
torch::Tensor PairTransIP::ghost_rows_to_device()
{
  const int64_t nghost_rows = static_cast<int64_t>(row_to_atom.size()) - halo_nlocal_rows;
  return ghost_feat.narrow(0, 0, nghost_rows).to(device, model_dtype);
}

/* Reverse communication of the ghost rows of g_h (undefined on a rank without model rows);
   returns the owned rows of g_h plus what they received: the gradient of out_{l-1}. Only the
   ghost rows go to the host, only the border rows' sums come back. Sums are accumulated and
   added in double (then rounded to the model's dtype), as the full-buffer version did. */
torch::Tensor PairTransIP::return_ghost_gradients(const torch::Tensor &g_h)
{
  const int nlocal = atom->nlocal;
  const int64_t nlocal_rows = halo_nlocal_rows;
  const int64_t nghost_rows = static_cast<int64_t>(row_to_atom.size()) - nlocal_rows;
  const int64_t nborder = static_cast<int64_t>(border_atoms.size());
  const int64_t nborder_rows = static_cast<int64_t>(border_rows.size());
  try {
    if (g_h.defined() && nghost_rows > 0)
      host_rows(ghost_feat, nghost_rows, halo_dtype)
          .copy_(g_h.narrow(0, nlocal_rows, nghost_rows));
    // a border atom's sum starts at 0 if it is owned, at its own gradient if it is a ghost
    // (multi-hop routes: it passes on what it received plus its own)
    torch::Tensor sums = host_rows(border_grad, nborder, torch::kFloat64);
    double *sp = sums.data_ptr<double>();
    const int64_t W = feature_width;
    for (int64_t k = 0; k < nborder; ++k) {
      const int i = border_atoms[k];
      if (i >= nlocal && atom_to_row[i] >= 0)
        load_row(ghost_feat, atom_to_row[i] - nlocal_rows, sp + k * W);
      else
        std::fill(sp + k * W, sp + (k + 1) * W, 0.0);
    }
  } catch (const std::exception &e) {
    error->one(FLERR, "pair_style transip: halo exchange failed at step {}: {}",
               update->ntimestep, last_line_of(e.what()));
  }
  comm->reverse_comm(this);
  if (!g_h.defined()) return torch::Tensor();
  try {
    torch::Tensor g_local = g_h.narrow(0, 0, nlocal_rows);
    if (nborder_rows == 0) return g_local;
    const torch::Tensor received = border_grad.narrow(0, 0, nborder_rows).to(device);
    const torch::Tensor summed =
        g_local.index_select(0, border_index).to(torch::kFloat64).add_(received);
    return g_local.index_copy(0, border_index, summed.to(model_dtype));
  } catch (const std::exception &e) {
    error->one(FLERR, "pair_style transip: halo exchange failed at step {}: {}",
               update->ntimestep, last_line_of(e.what()));
  }
}

int PairTransIP::pack_forward_comm(int n, int *list, double *buf, int /*pbc_flag*/,
                                   int * /*pbc*/)
{
  const int nlocal = atom->nlocal;
  const size_t W = static_cast<size_t>(feature_width);
  for (int k = 0; k < n; ++k) {
    const int i = list[k];
    double *dst = buf + size_t(k) * W;
    const int slot = border_slot[i];
    if (i >= nlocal)
      load_row(ghost_feat, ghost_slot[i - nlocal], dst);
    else if (atom_to_row[i] < 0)    // NULL type: no features
      std::fill(dst, dst + W, 0.0);
    else if (slot >= 0)
      load_row(border_feat, slot, dst);
    else
      load_row(all_local_rows(), atom_to_row[i], dst);
    if (slot == -1) {    // first time LAMMPS sends this atom since the reneighbouring
      border_slot[i] = -2;
      border_new.push_back(i);
    }
  }
  return static_cast<int>(n * W);
}

void PairTransIP::unpack_forward_comm(int n, int first, double *buf)
{
  const size_t W = static_cast<size_t>(feature_width);
  const int nlocal = atom->nlocal;
  for (int k = 0; k < n; ++k)
    store_row(buf + size_t(k) * W, ghost_feat, ghost_slot[first + k - nlocal]);
}

int PairTransIP::pack_reverse_comm(int n, int first, double *buf)
{
  const size_t W = static_cast<size_t>(feature_width);
  const int64_t nlocal_rows = halo_nlocal_rows;
  for (int k = 0; k < n; ++k) {
    const int i = first + k;
    double *dst = buf + size_t(k) * W;
    if (border_slot[i] >= 0)    // a ghost on a multi-hop route: its sum so far
      load_row(border_grad, border_slot[i], dst);
    else if (atom_to_row[i] >= 0)
      load_row(ghost_feat, atom_to_row[i] - nlocal_rows, dst);
    else
      std::fill(dst, dst + W, 0.0);
  }
  return static_cast<int>(n * W);
}

void PairTransIP::unpack_reverse_comm(int n, int *list, double *buf)
{
  const size_t W = static_cast<size_t>(feature_width);
  double *sums = border_grad.data_ptr<double>();
  for (int k = 0; k < n; ++k) {
    const int slot = border_slot[list[k]];
    if (slot < 0)
      error->one(FLERR,
                 "pair_style transip: reverse communication reached atom {} that forward "
                 "communication did not send (internal error)",
                 list[k]);
    double *dst = sums + size_t(slot) * W;
    const double *src = buf + size_t(k) * W;
    for (size_t c = 0; c < W; ++c) dst[c] += src[c];
  }
}

/* ----------------------------------------------------------------------
   One rank: rows are the owned atoms; each neighbour j (owned or a periodic
   ghost image) becomes an edge to the owned atom with the same ID, with the
   image offset x[j] - x[owner] as its shift. Exact, and the model sees N atoms.
------------------------------------------------------------------------- */

void PairTransIP::compute_owner_mapped()
{
  const int nlocal = atom->nlocal;
  double **x = atom->x;
  double **f = atom->f;
  const int *type = atom->type;
  const tagint *tag = atom->tag;
  const double cutsq_model = model_cutoff * model_cutoff;

  tagint maxtag = 0;
  for (int i = 0; i < nlocal; ++i) maxtag = std::max(maxtag, tag[i]);
  tag_to_local.assign(static_cast<size_t>(maxtag) + 1, -1);
  for (int i = 0; i < nlocal; ++i) tag_to_local[tag[i]] = i;

  atom_to_row.assign(nlocal, -1);
  row_to_atom.clear();
  pos_buf.clear();
  z_buf.clear();
  for (int i = 0; i < nlocal; ++i) {
    const int64_t z = type_to_z[type[i]];
    if (z <= 0) continue;
    atom_to_row[i] = static_cast<int>(row_to_atom.size());
    row_to_atom.push_back(i);
    pos_buf.push_back(x[i][0]);
    pos_buf.push_back(x[i][1]);
    pos_buf.push_back(x[i][2]);
    z_buf.push_back(z);
  }
  const int64_t nrows = static_cast<int64_t>(row_to_atom.size());

  edge_i_buf.clear();
  edge_j_buf.clear();
  shift_buf.clear();
  for (int ii = 0; ii < list->inum; ++ii) {
    const int i = list->ilist[ii];
    const int ri = i < nlocal ? atom_to_row[i] : -1;
    if (ri < 0) continue;
    const int *jlist = list->firstneigh[i];
    for (int jj = 0; jj < list->numneigh[i]; ++jj) {
      const int j = jlist[jj] & NEIGHMASK;
      const double dx = x[j][0] - x[i][0];
      const double dy = x[j][1] - x[i][1];
      const double dz = x[j][2] - x[i][2];
      if (dx * dx + dy * dy + dz * dz >= cutsq_model) continue;
      const int owner = j < nlocal ? j : (tag[j] <= maxtag ? tag_to_local[tag[j]] : -1);
      if (owner < 0)
        error->one(FLERR, "pair_style transip: ghost atom ID {} has no owned atom on this rank",
                   static_cast<bigint>(tag[j]));
      const int rj = atom_to_row[owner];
      if (rj < 0) continue;
      edge_i_buf.push_back(ri);
      edge_j_buf.push_back(rj);
      shift_buf.push_back(x[j][0] - x[owner][0]);
      shift_buf.push_back(x[j][1] - x[owner][1]);
      shift_buf.push_back(x[j][2] - x[owner][2]);
    }
  }
  const int64_t nedges = static_cast<int64_t>(edge_i_buf.size());
  if (report_load) {
    report_load = false;
    utils::logmesg(lmp, "TransIP: model input: {} owned atoms (ghosts mapped), {} edges\n",
                   nrows, nedges);
  }
  if (nrows == 0) return;

  torch::Tensor energies, forces, wvir;
  try {
    const ModelInputs in = model_inputs(nrows, nedges);
    const torch::Tensor &pos = in.pos, &numbers = in.numbers, &ei = in.edge_i,
                        &ej = in.edge_j, &q = in.charge, &s = in.spin;
    torch::Tensor sh = torch::from_blob(shift_buf.data(), {nedges, 3},
                                        torch::TensorOptions().dtype(torch::kFloat64));
    if (device.is_cuda()) sh = sh.to(device, model_dtype);
    const bool optimize = jit_optimize == 1;    // default off: faster on CPU and on the H100
    torch::jit::GraphOptimizerEnabledGuard jit_guard(optimize);
    auto out = model->get_method("lammps_periodic")({pos, numbers, ei, ej, sh, q, s});
    auto result = out.toTuple();
    energies = result->elements().at(0).toTensor().to(torch::kCPU, torch::kFloat64).contiguous();
    forces = result->elements().at(1).toTensor().to(torch::kCPU, torch::kFloat64).contiguous();
    wvir = result->elements().at(2).toTensor().to(torch::kCPU, torch::kFloat64).contiguous();
  } catch (const c10::Error &e) {
    model_failed(e.what_without_backtrace());
  } catch (const std::exception &e) {
    model_failed(e.what());
  }
  if (energies.dim() != 1 || energies.size(0) != nrows || forces.size(0) != nrows ||
      wvir.numel() != 6)
    model_failed("lammps_periodic() returned tensors of unexpected shapes");

  // eV -> the LAMMPS energy unit (energy_unit = 1 in units metal)
  const double u = energy_unit;
  const double *fr = forces.data_ptr<double>();
  const double *er = energies.data_ptr<double>();
  double esum = 0.0;
  for (int64_t r = 0; r < nrows; ++r) {
    const int i = row_to_atom[r];
    f[i][0] += u * fr[3 * r + 0];
    f[i][1] += u * fr[3 * r + 1];
    f[i][2] += u * fr[3 * r + 2];
    esum += u * er[r];
    if (eflag_atom) eatom[i] += u * er[r];
  }
  if (eflag_global) eng_vdwl += esum;
  if (vflag_global) {
    const double *w = wvir.data_ptr<double>();
    for (int k = 0; k < 6; ++k) virial[k] += u * w[k];
  }
}

// Logs (once after init, on rank 0) how many atoms and edges the model gets per rank: the
// number to watch for the cost of ghost atoms. Collective: every rank must call it.
void PairTransIP::report_model_load(int64_t nlocal_rows, int64_t nrows, int64_t nedges,
                                    const char *note)
{
  report_load = false;
  const double mine[4] = {double(nlocal_rows), double(nrows - nlocal_rows), double(nedges),
                          double(atom->nghost)};
  double sum[4], most[4], least[4];
  MPI_Reduce(mine, sum, 4, MPI_DOUBLE, MPI_SUM, 0, world);
  MPI_Reduce(mine, most, 4, MPI_DOUBLE, MPI_MAX, 0, world);
  MPI_Reduce(mine, least, 4, MPI_DOUBLE, MPI_MIN, 0, world);
  if (comm->me == 0)
    utils::logmesg(lmp,
                   "TransIP: model input over {} rank(s): {:.0f} owned + {:.0f} ghost atoms "
                   "({:.2f} per owned atom; LAMMPS holds {:.0f} ghosts{}), {:.0f} edges\n"
                   "TransIP: per rank: owned atoms {:.0f}..{:.0f}, model ghosts {:.0f}..{:.0f}\n",
                   comm->nprocs, sum[0], sum[1], sum[0] > 0 ? sum[1] / sum[0] : 0.0, sum[3],
                   note, sum[2], least[0], most[0], least[1], most[1]);
}

// The per-step model inputs from the scratch buffers (positions, atomic numbers, edges) plus
// charge and multiplicity, moved to the model's device; on a GPU positions travel in the
// model's dtype. On the CPU the tensors alias the buffers (no copy).
PairTransIP::ModelInputs PairTransIP::model_inputs(int64_t nrows, int64_t nedges)
{
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  const auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  ModelInputs in;
  in.pos = torch::from_blob(pos_buf.data(), {nrows, 3}, f64);
  in.numbers = torch::from_blob(z_buf.data(), {nrows}, i64);
  in.edge_i = torch::from_blob(edge_i_buf.data(), {nedges}, i64);
  in.edge_j = torch::from_blob(edge_j_buf.data(), {nedges}, i64);
  in.charge = torch::scalar_tensor(total_charge, i64);
  in.spin = torch::scalar_tensor(multiplicity, i64);
  if (device.is_cuda()) {
    in.pos = in.pos.to(device, model_dtype);
    in.numbers = in.numbers.to(device);
    in.edge_i = in.edge_i.to(device);
    in.edge_j = in.edge_j.to(device);
    in.charge = in.charge.to(device);
    in.spin = in.spin.to(device);
  }
  return in;
}

// Forces of the model's rows onto their LAMMPS atoms (ghost rows included: reverse
// communication sums them into the owners), per-atom and total energies of the first
// nlocal_rows rows, and - when LAMMPS asks for the pair virial without fdotr (some hybrid
// setups) - the virial of these forces, sum over rows of x (x) f. The model's eV become the
// LAMMPS energy unit here (energy_unit; 1 in units metal), so atom->f holds LAMMPS units and
// virial_fdotr_compute() needs no conversion.
void PairTransIP::add_model_results(const double *fr, int64_t nrows, const double *er,
                                    int64_t nlocal_rows)
{
  const double u = energy_unit;
  double **x = atom->x;
  double **f = atom->f;
  for (int64_t r = 0; r < nrows; ++r) {
    const int i = row_to_atom[r];
    f[i][0] += u * fr[3 * r + 0];
    f[i][1] += u * fr[3 * r + 1];
    f[i][2] += u * fr[3 * r + 2];
  }
  double esum = 0.0;
  for (int64_t r = 0; r < nlocal_rows; ++r) {
    esum += u * er[r];
    if (eflag_atom) eatom[row_to_atom[r]] += u * er[r];
  }
  if (eflag_global) eng_vdwl += esum;
  if (vflag_global && !vflag_fdotr) {
    for (int64_t r = 0; r < nrows; ++r) {
      const double *xi = x[row_to_atom[r]];
      const double *fi = fr + 3 * r;
      virial[0] += u * xi[0] * fi[0];
      virial[1] += u * xi[1] * fi[1];
      virial[2] += u * xi[2] * fi[2];
      virial[3] += u * xi[0] * fi[1];    // same index order as virial_fdotr_compute()
      virial[4] += u * xi[0] * fi[2];
      virial[5] += u * xi[1] * fi[2];
    }
  }
}

double PairTransIP::memory_usage()
{
  double bytes = Pair::memory_usage();
  bytes += atom_to_row.capacity() * sizeof(int) + row_to_atom.capacity() * sizeof(int);
  bytes += pos_buf.capacity() * sizeof(double) + z_buf.capacity() * sizeof(int64_t);
  bytes += (edge_i_buf.capacity() + edge_j_buf.capacity()) * sizeof(int64_t);
  for (const torch::Tensor *block : {&border_feat, &ghost_feat, &border_grad})
    if (block->defined()) bytes += double(block->numel() * block->element_size());
  bytes += (border_atoms.capacity() + border_slot.capacity() + ghost_slot.capacity()) * sizeof(int);
  return bytes;
}
