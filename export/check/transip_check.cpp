// transip_check: load an exported transip-md model with libtorch alone (no Python, no custom
// operators) and evaluate one structure, to prove that the file is self-contained.
//
//   transip_check model.pt input.xyz [--device cpu|cuda[:N]] [--charge Q] [--spin M]
//                 [--cell ax ay az bx by bz cx cy cz] [--threads N]
//   transip_check --parse-only input.xyz [--charge Q] [--spin M] [--cell ...]
//
// Input: plain .xyz (atom count, comment line, "El x y z" lines in Å). An extended-xyz comment
// line may carry Lattice="ax ay az bx by bz cx cy cz" (rows = lattice vectors, Å; periodic in
// all three directions unless pbc="T T F" says otherwise) and charge=Q / spin=M (total charge,
// spin multiplicity; the command-line options win). Only the first frame is read.
//
// Output on stdout, one "key value" per line ('#' lines are comments), numbers with %.17g:
//   # the file's declaration (format version, capabilities, species, limits, unit factors)
//   natoms N / charge Q / spin M / periodic 0|1 / energy E (eV)
//   forces N, then N lines "fx fy fz" (eV/Å)
//   stress 3, then 3 lines (eV/Å^3, periodic systems only)
// Any error: one message on stderr, exit status 2. See export/README.md.
//
// The model file is read through the door shared with the LAMMPS plugin (transip_model.h in
// lammps_examples/plugin): format version, declaration (or the probe of format <= 2 files),
// the compute capability, the element table, and the model's error messages. Before compute
// the model's own input rules run: validate (elements, charge and multiplicity ranges) and
// validate_electrons (the electron count of the whole structure), as in every other engine.

#include "transip_model.h"

#include <ATen/Parallel.h>
#include <torch/cuda.h>
#include <torch/script.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>


namespace {

// How messages of the model door name this program.
const transip::Reader kReader{"transip_check", "this transip_check",
                              "python export/check/build.py"};

// Every failure the user should see becomes one of these; main() prints it and exits 2.
struct UserError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string model_path;
  std::string xyz_path;
  std::string device = "cpu";
  bool parse_only = false;
  bool has_charge = false, has_spin = false, has_cell = false;
  int64_t charge = 0, spin = 1;
  std::array<double, 9> cell{};
  int threads = 0;
};

struct Structure {
  std::vector<int64_t> numbers;
  std::vector<double> positions;  // N*3, Å
  std::array<double, 9> cell{};   // rows = lattice vectors, Å
  std::array<bool, 3> pbc{{false, false, false}};
  bool has_charge = false, has_spin = false;
  int64_t charge = 0, spin = 1;
};

const char* const kUsage =
    "usage: transip_check MODEL.pt INPUT.xyz [--device cpu|cuda[:N]] [--charge Q] [--spin M]\n"
    "                     [--cell ax ay az bx by bz cx cy cz] [--threads N]\n"
    "       transip_check --parse-only INPUT.xyz [--charge Q] [--spin M] [--cell ...]\n";

std::string trim(const std::string& s) {
  size_t a = s.find_first_not_of(" \t\r\n");
  if (a == std::string::npos) return "";
  size_t b = s.find_last_not_of(" \t\r\n");
  return s.substr(a, b - a + 1);
}

std::vector<std::string> split_ws(const std::string& s) {
  std::istringstream in(s);
  std::vector<std::string> out;
  std::string tok;
  while (in >> tok) out.push_back(tok);
  return out;
}

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool parse_double(const std::string& s, double* out) {
  if (s.empty()) return false;
  char* end = nullptr;
  *out = std::strtod(s.c_str(), &end);
  return end == s.c_str() + s.size();
}

bool parse_int(const std::string& s, int64_t* out) {
  if (s.empty()) return false;
  char* end = nullptr;
  errno = 0;
  long long v = std::strtoll(s.c_str(), &end, 10);
  if (errno != 0 || end != s.c_str() + s.size()) return false;
  *out = static_cast<int64_t>(v);
  return true;
}

// Atomic number of a symbol ("C", "Cl"; case-insensitive) or of a plain number ("6"); 0 if
// unknown. Which elements a model supports is the model's own rule (validate).
int64_t atomic_number(const std::string& token) {
  int64_t z = 0;
  if (parse_int(token, &z)) return (z >= 1 && z <= transip::kMaxAtomicNumber) ? z : 0;
  return transip::atomic_number_any_case(token);
}

// key=value pairs of an extended-xyz comment line; values may be "double quoted".
std::map<std::string, std::string> parse_comment(const std::string& line) {
  std::map<std::string, std::string> kv;
  size_t i = 0, n = line.size();
  while (i < n) {
    while (i < n && std::isspace(static_cast<unsigned char>(line[i]))) ++i;
    size_t key_start = i;
    while (i < n && line[i] != '=' && !std::isspace(static_cast<unsigned char>(line[i]))) ++i;
    std::string key = line.substr(key_start, i - key_start);
    if (i >= n || line[i] != '=') {  // a bare word: not a key=value pair
      continue;
    }
    ++i;  // '='
    std::string value;
    if (i < n && line[i] == '"') {
      size_t close = line.find('"', i + 1);
      if (close == std::string::npos) close = n;
      value = line.substr(i + 1, close - i - 1);
      i = close + 1;
    } else {
      size_t start = i;
      while (i < n && !std::isspace(static_cast<unsigned char>(line[i]))) ++i;
      value = line.substr(start, i - start);
    }
    if (!key.empty()) kv[lower(key)] = value;
  }
  return kv;
}

bool parse_bool_flag(const std::string& s, bool* out) {
  std::string v = lower(s);
  if (v == "t" || v == "true" || v == "1") { *out = true; return true; }
  if (v == "f" || v == "false" || v == "0") { *out = false; return true; }
  return false;
}

Structure read_xyz(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw UserError("cannot open input file '" + path + "'");
  auto where = [&](long line_no) { return path + ":" + std::to_string(line_no) + ": "; };
  std::string line;
  long line_no = 0;

  if (!std::getline(in, line)) throw UserError(path + ": empty file, expected an atom count on line 1");
  ++line_no;
  int64_t count = 0;
  std::vector<std::string> head = split_ws(line);
  if (head.size() != 1 || !parse_int(head[0], &count) || count < 1) {
    throw UserError(where(line_no) + "expected the number of atoms (a positive integer), got '" +
                    trim(line) + "'");
  }
  if (!std::getline(in, line)) throw UserError(where(line_no + 1) + "missing comment line");
  ++line_no;

  Structure s;
  auto kv = parse_comment(line);
  if (kv.count("properties")) {
    std::string props = lower(kv["properties"]);
    if (props.rfind("species:s:1:pos:r:3", 0) != 0) {
      throw UserError(where(line_no) + "unsupported Properties='" + kv["properties"] +
                      "': columns must start with species:S:1:pos:R:3");
    }
  }
  if (kv.count("lattice")) {
    std::vector<std::string> t = split_ws(kv["lattice"]);
    bool ok = t.size() == 9;
    for (size_t k = 0; ok && k < 9; ++k) ok = parse_double(t[k], &s.cell[k]);
    if (!ok) {
      throw UserError(where(line_no) + "Lattice=\"...\" needs 9 numbers (ax ay az bx by bz cx cy cz), got \"" +
                      kv["lattice"] + "\"");
    }
    s.pbc = {{true, true, true}};
  }
  if (kv.count("pbc")) {
    std::vector<std::string> t = split_ws(kv["pbc"]);
    bool ok = t.size() == 3;
    for (size_t k = 0; ok && k < 3; ++k) ok = parse_bool_flag(t[k], &s.pbc[k]);
    if (!ok) throw UserError(where(line_no) + "pbc=\"...\" needs three of T/F, got \"" + kv["pbc"] + "\"");
    if ((s.pbc[0] || s.pbc[1] || s.pbc[2]) && !kv.count("lattice")) {
      throw UserError(where(line_no) + "pbc=\"" + kv["pbc"] + "\" without a Lattice=\"...\"");
    }
  }
  if (kv.count("charge")) {
    if (!parse_int(kv["charge"], &s.charge)) {
      throw UserError(where(line_no) + "charge=" + kv["charge"] + " is not an integer");
    }
    s.has_charge = true;
  }
  if (kv.count("spin")) {
    if (!parse_int(kv["spin"], &s.spin)) {
      throw UserError(where(line_no) + "spin=" + kv["spin"] + " is not an integer multiplicity");
    }
    s.has_spin = true;
  }

  s.numbers.reserve(static_cast<size_t>(count));
  s.positions.reserve(static_cast<size_t>(count) * 3);
  for (int64_t a = 0; a < count; ++a) {
    if (!std::getline(in, line)) {
      throw UserError(where(line_no + 1) + "file ends after " + std::to_string(a) + " of " +
                      std::to_string(count) + " atoms");
    }
    ++line_no;
    std::vector<std::string> t = split_ws(line);
    double xyz[3];
    if (t.size() < 4 || !parse_double(t[1], &xyz[0]) || !parse_double(t[2], &xyz[1]) ||
        !parse_double(t[3], &xyz[2])) {
      throw UserError(where(line_no) + "expected 'El x y z', got '" + trim(line) + "'");
    }
    int64_t z = atomic_number(t[0]);
    if (z == 0) {
      throw UserError(where(line_no) + "unknown element symbol '" + t[0] +
                      "' (known: H..Og, Z = 1..118)");
    }
    s.numbers.push_back(z);
    s.positions.insert(s.positions.end(), xyz, xyz + 3);
  }
  return s;
}

Options parse_args(int argc, char** argv) {
  Options o;
  std::vector<std::string> positional;
  auto need = [&](int& i, int n, const std::string& flag) {
    if (i + n >= argc) throw UserError(flag + " needs " + std::to_string(n) + " value(s)\n" + kUsage);
  };
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else if (a == "--parse-only") {
      o.parse_only = true;
    } else if (a == "--device") {
      need(i, 1, a);
      o.device = argv[++i];
    } else if (a == "--charge") {
      need(i, 1, a);
      if (!parse_int(argv[++i], &o.charge)) throw UserError("--charge needs an integer, got '" + std::string(argv[i]) + "'");
      o.has_charge = true;
    } else if (a == "--spin") {
      need(i, 1, a);
      if (!parse_int(argv[++i], &o.spin)) throw UserError("--spin needs an integer multiplicity, got '" + std::string(argv[i]) + "'");
      o.has_spin = true;
    } else if (a == "--cell") {
      need(i, 9, a);
      for (int k = 0; k < 9; ++k) {
        if (!parse_double(argv[++i], &o.cell[k])) throw UserError("--cell needs 9 numbers, got '" + std::string(argv[i]) + "'");
      }
      o.has_cell = true;
    } else if (a == "--threads") {
      need(i, 1, a);
      int64_t n = 0;
      if (!parse_int(argv[++i], &n) || n < 1) throw UserError("--threads needs a positive integer");
      o.threads = static_cast<int>(n);
    } else if (a.size() > 1 && a[0] == '-' && a[1] == '-') {
      throw UserError("unknown option '" + a + "'\n" + kUsage);
    } else {
      positional.push_back(a);
    }
  }
  size_t want = o.parse_only ? 1 : 2;
  if (positional.size() != want) throw UserError(std::string("wrong number of arguments\n") + kUsage);
  if (o.parse_only) {
    o.xyz_path = positional[0];
  } else {
    o.model_path = positional[0];
    o.xyz_path = positional[1];
  }
  return o;
}

void print_row(const double* v, int n) {
  for (int k = 0; k < n; ++k) std::printf(k ? " %.17g" : "%.17g", v[k]);
  std::printf("\n");
}

void finish_inputs(const Options& o, Structure* s) {
  if (o.has_cell) {
    s->cell = o.cell;
    s->pbc = {{true, true, true}};
  }
  if (o.has_charge) s->charge = o.charge;
  if (o.has_spin) s->spin = o.spin;
}

int parse_only(const Options& o) {
  Structure s = read_xyz(o.xyz_path);
  finish_inputs(o, &s);
  bool periodic = s.pbc[0] || s.pbc[1] || s.pbc[2];
  std::printf("natoms %zu\ncharge %lld\nspin %lld\nperiodic %d\n", s.numbers.size(),
              static_cast<long long>(s.charge), static_cast<long long>(s.spin), periodic ? 1 : 0);
  std::printf("pbc %d %d %d\ncell 3\n", s.pbc[0], s.pbc[1], s.pbc[2]);
  for (int r = 0; r < 3; ++r) print_row(&s.cell[3 * r], 3);
  std::printf("atoms %zu\n", s.numbers.size());
  for (size_t a = 0; a < s.numbers.size(); ++a) {
    std::printf("%lld ", static_cast<long long>(s.numbers[a]));
    print_row(&s.positions[3 * a], 3);
  }
  return 0;
}

// The model file through the door; every refusal becomes a one-line UserError.
transip::Model load_model(const std::string& path, const torch::Device& device) {
  try {
    transip::Model model = transip::Model::load(path, device, kReader);
    model.require({"compute"}, "transip_check");
    return model;
  } catch (const transip::ModelFileError& e) {
    throw UserError(e.what());
  }
}

// Runs a model method; an error it raises becomes "model error: <its last line>", with the
// atoms it names (rows of the input) given as lines of the xyz file.
template <typename Fn>
c10::IValue run_model(Fn&& fn, const std::string& xyz_path) {
  try {
    return fn();
  } catch (const std::exception& e) {
    transip::ModelMessage why = transip::translate_model_error(e);
    std::string where;
    for (int64_t row : why.rows)  // line 1: count, line 2: comment, then one atom per line
      where += (where.empty() ? "" : ", ") + std::string("atom ") + std::to_string(row) +
               " on line " + std::to_string(row + 3);
    throw UserError("model error: " + why.text +
                    (where.empty() ? std::string() : " [" + xyz_path + ": " + where + "]"));
  }
}

const char* dtype_name(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat64: return "float64";
    case torch::kFloat32: return "float32";
    default: return c10::toString(t);
  }
}

int run(const Options& o) {
  torch::Device device(torch::kCPU);
  try {
    device = torch::Device(o.device);
  } catch (const std::exception& e) {
    throw UserError("bad --device '" + o.device + "': use cpu, cuda or cuda:N");
  }
  if (device.is_cuda() && !torch::cuda::is_available()) {
    throw UserError("--device " + o.device + " asked for, but libtorch sees no CUDA device");
  }
  if (o.threads > 0) at::set_num_threads(o.threads);

  // Read the input before the (slower) model load, so input mistakes are reported at once.
  Structure s = read_xyz(o.xyz_path);
  finish_inputs(o, &s);
  transip::Model model = load_model(o.model_path, device);
  for (const std::string& warning : model.warnings())
    std::fprintf(stderr, "transip_check: warning: %s\n", warning.c_str());
  torch::ScalarType dtype = model.dtype();

  const int64_t n = static_cast<int64_t>(s.numbers.size());
  auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  torch::Tensor positions =
      torch::from_blob(s.positions.data(), {n, 3}, f64).to(device, dtype);
  torch::Tensor numbers =
      torch::from_blob(s.numbers.data(), {n}, torch::TensorOptions().dtype(torch::kInt64)).to(device);
  torch::Tensor cell = torch::from_blob(s.cell.data(), {3, 3}, f64).to(device, dtype);
  torch::Tensor pbc = torch::tensor({s.pbc[0], s.pbc[1], s.pbc[2]}, torch::kBool).to(device);
  torch::Tensor charge = torch::scalar_tensor(s.charge, torch::kInt64);
  torch::Tensor spin = torch::scalar_tensor(s.spin, torch::kInt64);
  const bool periodic = s.pbc[0] || s.pbc[1] || s.pbc[2];

  // The model's rules for the whole structure first (compute checks the cell itself).
  if (model.offers("validate")) {
    run_model([&] { return model.method("validate")({positions, numbers, charge, spin}); },
              o.xyz_path);
  }
  if (model.offers("validate_electrons")) {
    int64_t total_z = 0;
    for (int64_t z : s.numbers) total_z += z;
    run_model([&] {
      return model.method("validate_electrons")({total_z, s.charge, s.spin, n});
    }, o.xyz_path);
  }
  c10::IValue result = run_model([&] {
    return model.method("compute")({positions, numbers, cell, pbc, charge, spin,
                                    /*compute_forces=*/true, /*compute_stress=*/periodic});
  }, o.xyz_path);
  auto out = result.toGenericDict();
  auto get = [&](const char* key) {
    return out.at(key).toTensor().detach().to(torch::kCPU, torch::kFloat64).contiguous();
  };

  std::printf("# transip_check model=%s format_version=%lld dtype=%s device=%s\n",
              o.model_path.c_str(), static_cast<long long>(model.format_version()),
              dtype_name(dtype), device.str().c_str());
  std::istringstream declaration(model.describe());
  for (std::string line; std::getline(declaration, line);) std::printf("# %s\n", line.c_str());
  std::printf("natoms %lld\ncharge %lld\nspin %lld\nperiodic %d\n", static_cast<long long>(n),
              static_cast<long long>(s.charge), static_cast<long long>(s.spin), periodic ? 1 : 0);
  std::printf("energy %.17g\n", get("energy").item<double>());
  torch::Tensor forces = get("forces");
  std::printf("forces %lld\n", static_cast<long long>(n));
  const double* fp = forces.data_ptr<double>();
  for (int64_t a = 0; a < n; ++a) print_row(fp + 3 * a, 3);
  if (periodic) {
    torch::Tensor stress = get("stress");
    std::printf("stress 3\n");
    for (int r = 0; r < 3; ++r) print_row(stress.data_ptr<double>() + 3 * r, 3);
  }
  std::fflush(stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    Options o = parse_args(argc, argv);
    return o.parse_only ? parse_only(o) : run(o);
  } catch (const UserError& e) {
    std::fprintf(stderr, "transip_check: error: %s\n", e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "transip_check: error: %s\n",
                 transip::last_line_of(transip::error_text(e)).c_str());
  }
  return 2;
}
