/* -*- c++ -*- ----------------------------------------------------------
   The one C++ door to an exported transip-md model file (export/CONTRACT.md), shared by the
   LAMMPS plugin (pair_style transip) and the no-Python check program (export/check/
   transip_check). libtorch and the C++ standard library only: no LAMMPS, no MPI.

   transip::Model::load(path, device, reader) does, in this order:
     1. the file: exists, is a regular file (a directory, FIFO or device is refused before it
        is opened), is a zip archive, holds TorchScript code (a training checkpoint, a
        torch.save() file, a truncated copy are each named as what they are), and is intact:
        every member passes its zip CRC-32, no name occurs twice, every tensor record has the
        size data.pkl gives it (torch::jit::load checks none of these);
     2. torch::jit::load on the requested device;
     3. format_version: 1 .. kMaxFormatVersion, else refused (0: scripted, never exported);
     4. the declaration: format 3 files carry it as typed attributes (capabilities, limits,
        species, unit_factors, operator_library); older files are probed here and nowhere
        else (find_method, element_list(), metadata_json). Entry points of format 2 carry old
        names, resolved through kFormat2Aliases: callers use the format-3 names only;
     5. the operator library, which must be loaded in this process ("" = none needed);
     6. the exporter's torch major version against this build's (a warning);
     7. the weights: finite, and equal to the weights_digest the export recorded (files
        without one, exported before it existed, are not compared).
   Model::require(entries, who) then refuses a file that lacks an entry point the caller
   needs, saying to re-export it. Errors are ModelFileError (message names the file and what
   to do); the caller adds its own prefix and reports them its own way.

   Errors raised inside the model (translate_model_error) keep their last line ("ValueError:
   ...") and lose the machine-readable suffix " [atom rows: i j]", whose rows come back
   separately for the engine to translate into its own atom numbering.
------------------------------------------------------------------------- */

#ifndef TRANSIP_MODEL_H
#define TRANSIP_MODEL_H

#include <torch/script.h>

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace transip {

// Highest model format version this build reads (export/CONTRACT.md, section 8).
constexpr int64_t kMaxFormatVersion = 3;

// Entry points renamed by format 3: format-3 name -> the name format <= 2 files use.
extern const std::vector<std::pair<std::string, std::string>> kFormat2Aliases;

// ---------------------------------------------------------------- elements (one table)
constexpr int kMaxAtomicNumber = 118;

// Chemical symbol of atomic number z ("" outside 1..118).
const char *element_symbol(int z);
// Atomic number of an exact chemical symbol ("Cl"), 0 if it is none.
int atomic_number(const std::string &symbol);
// Atomic number of a symbol in any letter case ("CL", "cl"), 0 if it is none.
int atomic_number_any_case(const std::string &symbol);
// Standard atomic mass (g/mol) of element z: the IUPAC 2016 conventional values as ASE ships
// them (ase.data.atomic_masses_iupac2016); 0 outside 1..118.
double standard_mass(int z);

// ---------------------------------------------------------------- errors of the model
// The text of an exception from libtorch, without c10's C++ backtrace.
std::string error_text(const std::exception &e);
// The user-facing reason of a TorchScript error: its last non-empty line before c10's
// backtrace, "builtins." removed ("ValueError: element C ...").
std::string last_line_of(const std::string &text);
// "ValueError: x" -> "x" (other kinds are kept: they are not input errors).
std::string without_value_error(const std::string &text);

struct ModelMessage {
  std::string text;              // the message, without the " [atom rows: ...]" suffix
  std::vector<int64_t> rows;     // rows of the model input it names (may be empty)
  bool empty() const { return text.empty(); }
};
// "atoms 3 and 7 ... [atom rows: 3 7]" -> {"atoms 3 and 7 ...", {3, 7}}.
ModelMessage split_atom_rows(const std::string &message);
// An exception thrown by a model method -> its last line, rows split off.
ModelMessage translate_model_error(const std::exception &e);

// ---------------------------------------------------------------- the file
// A file that cannot be used, or lacks what the caller needs. The message names the file and
// says what to do; it has no prefix of its own.
struct ModelFileError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Who reads the file, for messages.
struct Reader {
  std::string program;    // what it is: "pair_style transip", "transip_check"
  std::string self;       // how a message names it: "this plugin", "this transip_check"
  std::string rebuild;    // how to rebuild it from a newer transip-md
};

class Model {
 public:
  // Steps 1-7 above; throws ModelFileError.
  static Model load(const std::string &path, const torch::Device &device, const Reader &reader);

  // Refuses (ModelFileError) a file without one of `entries` (format-3 names), naming the
  // file, the entry point and "re-export it with python -m transip_md.export".
  void require(const std::vector<std::string> &entries, const std::string &who) const;

  const std::string &path() const { return path_; }
  torch::jit::Module &module() { return module_; }
  const torch::jit::Module &module() const { return module_; }
  int64_t format_version() const { return format_version_; }
  // true: the file declares itself (format >= 3); false: probed (format <= 2).
  bool declared() const { return declared_; }
  torch::Dtype dtype() const { return dtype_; }

  // Entry point (format-3 name) -> contract version; 0 if the file does not offer it.
  const std::map<std::string, int64_t> &capabilities() const { return capabilities_; }
  bool offers(const std::string &entry) const { return capabilities_.count(entry) > 0; }
  // The method behind an entry point (old name in format-2 files); throws ModelFileError if
  // the file does not offer it.
  torch::jit::Method method(const std::string &entry);
  const std::string &method_name(const std::string &entry) const;

  const std::map<std::string, double> &limits() const { return limits_; }
  // limits()[name], or `fallback` if the file does not give it.
  double limit(const std::string &name, double fallback = 0.0) const;
  double cutoff() const { return limit("cutoff"); }
  double receptive_field() const { return limit("receptive_field"); }
  int64_t num_layers() const { return static_cast<int64_t>(limit("num_layers") + 0.5); }

  // Element symbol -> atomic number: the elements the model was trained on.
  const std::map<std::string, int64_t> &species() const { return species_; }
  // The same symbols in increasing atomic number.
  std::vector<std::string> elements() const;

  // Unit factor (kj_per_mol_per_ev, angstrom_per_nm, kcal_per_mol_per_ev); 0 if the file
  // gives none. unit_factor_source: where it came from (for logs).
  double unit_factor(const std::string &name) const;
  std::string unit_factor_source(const std::string &name) const;

  const std::string &operator_library() const { return operator_library_; }
  const std::string &torch_version() const { return torch_version_; }    // "" unknown
  // Things the reader should pass on to the user once (e.g. another torch major version).
  const std::vector<std::string> &warnings() const { return warnings_; }

  // Runs a checking entry point (validate, validate_cell, validate_electrons) with `args`;
  // an empty message if it passed or the file does not offer it with that many arguments,
  // else the reason without "ValueError: " (rows split off).
  ModelMessage refusal(const std::string &entry, std::vector<c10::IValue> args);

  // A few lines describing the declaration (format, capabilities, species, limits, units).
  std::string describe() const;

 private:
  Model() = default;
  void read_declaration();
  void probe_declaration();
  void check_declaration(const Reader &reader);
  void check_weights();

  std::string path_;
  torch::jit::Module module_;
  int64_t format_version_ = 0;
  bool declared_ = false;
  torch::Dtype dtype_ = torch::kFloat64;
  std::map<std::string, int64_t> capabilities_;
  std::map<std::string, std::string> method_names_;
  std::map<std::string, double> limits_;
  std::map<std::string, int64_t> species_;
  std::map<std::string, double> unit_factors_;
  std::map<std::string, std::string> unit_sources_;
  std::string operator_library_;
  std::string torch_version_;
  std::vector<std::string> warnings_;
};

// Operator libraries loaded in this process (none exist yet; see export/CONTRACT.md).
std::vector<std::string> loaded_operator_libraries();

}    // namespace transip

#endif
