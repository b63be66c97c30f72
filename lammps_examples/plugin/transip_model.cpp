/* ----------------------------------------------------------------------
   The C++ door to exported transip-md model files: see transip_model.h.
------------------------------------------------------------------------- */

#include "transip_model.h"

#include <caffe2/serialize/inline_container.h>
#include <torch/version.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <locale>
#include <memory>
#include <set>
#include <sstream>
#include <unordered_map>

#include <dlfcn.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace transip {

const std::vector<std::pair<std::string, std::string>> kFormat2Aliases = {
    {"local_energies_forces", "lammps"},
    {"mapped_energies_forces_virial", "lammps_periodic"},
};

namespace {

// ---------------------------------------------------------------- elements
// Chemical symbols indexed by atomic number (index 0 is a placeholder).
const char *const ELEMENT_SYMBOLS[] = {
    "",   "H",  "He", "Li", "Be", "B",  "C",  "N",  "O",  "F",  "Ne", "Na", "Mg", "Al", "Si",
    "P",  "S",  "Cl", "Ar", "K",  "Ca", "Sc", "Ti", "V",  "Cr", "Mn", "Fe", "Co", "Ni", "Cu",
    "Zn", "Ga", "Ge", "As", "Se", "Br", "Kr", "Rb", "Sr", "Y",  "Zr", "Nb", "Mo", "Tc", "Ru",
    "Rh", "Pd", "Ag", "Cd", "In", "Sn", "Sb", "Te", "I",  "Xe", "Cs", "Ba", "La", "Ce", "Pr",
    "Nd", "Pm", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm", "Yb", "Lu", "Hf", "Ta", "W",
    "Re", "Os", "Ir", "Pt", "Au", "Hg", "Tl", "Pb", "Bi", "Po", "At", "Rn", "Fr", "Ra", "Ac",
    "Th", "Pa", "U",  "Np", "Pu", "Am", "Cm", "Bk", "Cf", "Es", "Fm", "Md", "No", "Lr", "Rf",
    "Db", "Sg", "Bh", "Hs", "Mt", "Ds", "Rg", "Cn", "Nh", "Fl", "Mc", "Lv", "Ts", "Og"};
static_assert(sizeof(ELEMENT_SYMBOLS) / sizeof(ELEMENT_SYMBOLS[0]) == kMaxAtomicNumber + 1,
              "one symbol per element");

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
static_assert(sizeof(STANDARD_MASSES) / sizeof(STANDARD_MASSES[0]) == kMaxAtomicNumber + 1,
              "one standard mass per element symbol");

std::string lower(std::string s)
{
  for (auto &c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string basename_of(const std::string &path)
{
  const size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

bool ends_with(const std::string &s, const std::string &tail)
{
  return s.size() >= tail.size() && s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
}

std::string in_quotes(const std::string &path) { return "'" + path + "'"; }

std::string number_text(double v)
{
  std::ostringstream out;
  out.imbue(std::locale::classic());
  out.precision(12);
  out << v;
  return out.str();
}

// ---------------------------------------------------------------- metadata_json
// A few values from the model's metadata JSON (module attribute metadata_json) without a JSON
// library. The exporter writes it with json.dumps: keys are quoted strings, unique per object.

// Offset of the value of key `key` among the members of the object starting at json[start]
// == '{' (members of nested objects are not looked at); std::string::npos if it is not there.
size_t json_member(const std::string &json, size_t start, const std::string &key)
{
  if (start >= json.size() || json[start] != '{') return std::string::npos;
  int depth = 0;
  for (size_t k = start; k < json.size(); ++k) {
    const char c = json[k];
    if (c == '"') {
      const size_t begin = k + 1;
      size_t end = begin;
      while (end < json.size() && json[end] != '"') end += json[end] == '\\' ? 2 : 1;
      if (end >= json.size()) return std::string::npos;
      k = end;
      if (depth != 1) continue;
      size_t v = end + 1;
      while (v < json.size() && std::isspace(static_cast<unsigned char>(json[v]))) ++v;
      if (v >= json.size() || json[v] != ':') continue;    // a string value, not a key
      if (json.compare(begin, end - begin, key) != 0) continue;
      ++v;
      while (v < json.size() && std::isspace(static_cast<unsigned char>(json[v]))) ++v;
      return v < json.size() ? v : std::string::npos;
    }
    if (c == '{' || c == '[') ++depth;
    else if ((c == '}' || c == ']') && --depth == 0) break;
  }
  return std::string::npos;
}

// Offset of the value at path (object keys from the top level), npos if missing.
size_t json_value_at(const std::string &json, const std::vector<std::string> &path)
{
  size_t at = json.find('{');
  for (const std::string &key : path) {
    if (at == std::string::npos) return at;
    at = json_member(json, at, key);
  }
  return at;
}

bool json_number_at(const std::string &json, const std::vector<std::string> &path, double &value)
{
  const size_t at = json_value_at(json, path);
  if (at == std::string::npos) return false;
  std::istringstream in(json.substr(at, 64));
  in.imbue(std::locale::classic());    // '.' decimal point whatever the process locale
  double v = 0.0;
  if (!(in >> v) || !std::isfinite(v)) return false;
  value = v;
  return true;
}

bool json_string_at(const std::string &json, const std::vector<std::string> &path,
                    std::string &value)
{
  const size_t at = json_value_at(json, path);
  if (at == std::string::npos || json[at] != '"') return false;
  const size_t end = json.find('"', at + 1);
  if (end == std::string::npos) return false;
  value = json.substr(at + 1, end - at - 1);
  return true;
}

// ---------------------------------------------------------------- zip sniffing
// A minimal zip reader (central directory, stored entries), enough to tell a TorchScript
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
  uint64_t usize = 0;       // uncompressed size
  uint32_t crc = 0;         // CRC-32 of the uncompressed bytes (central directory)
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
    e.crc = static_cast<uint32_t>(le(&dir[k + 16], 4));
    e.size = le(&dir[k + 20], 4);
    const uint64_t usize = le(&dir[k + 24], 4);
    e.usize = usize;
    e.local_offset = le(&dir[k + 42], 4);
    // zip64 extra field (id 1): the 64-bit values of the fields set to 0xFFFFFFFF, in order
    for (size_t x = k + 46 + name_len; x + 4 <= k + 46 + name_len + extra_len;) {
      const uint64_t id = le(&dir[x], 2), len = le(&dir[x + 2], 2);
      if (x + 4 + len > dir.size()) break;
      if (id == 1) {
        size_t f = x + 4;
        if (usize == 0xFFFFFFFF && f + 8 <= x + 4 + len) e.usize = le(&dir[f], 8), f += 8;
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

/* What a model file is, when it is not a TorchScript archive: "" for a zip with TorchScript
   code (or metadata) in it, which torch::jit::load then reads; else the message to stop
   with. A TorchScript archive holds <root>/code/..., <root>/constants.pkl and <root>/data.pkl;
   torch.save() writes <root>/data.pkl and <root>/data/<n> only, and a transip-md training
   checkpoint pickles its kind string, stored uncompressed in data.pkl. */
std::string archive_problem(std::FILE *fp, const std::string &path, const Reader &reader)
{
  std::vector<ZipEntry> entries;
  const ZipStatus status = read_zip_directory(fp, entries);
  const std::string needs =
      reader.program + " needs a model file exported with python -m transip_md.export";
  if (status == ZipStatus::NOT_ZIP)
    return in_quotes(path) +
        " is not a TorchScript archive (not a zip file at all: truncated or corrupt? or "
        "another kind of file). " + needs;
  if (status == ZipStatus::DAMAGED)
    return in_quotes(path) +
        " is not a loadable TorchScript archive: its zip directory is missing or damaged "
        "(truncated or corrupt? an interrupted copy or download); copy or export it again";
  bool torchscript = false;
  const ZipEntry *pickle = nullptr;
  for (const ZipEntry &e : entries) {
    if (e.name.find("/code/") != std::string::npos || ends_with(e.name, "/constants.pkl") ||
        ends_with(e.name, "/extra/metadata.json"))
      torchscript = true;
    if (ends_with(e.name, "/data.pkl") && e.name.find('/') == e.name.size() - 9) pickle = &e;
  }
  if (torchscript) return "";
  if (pickle && zip_entry_contains(fp, *pickle, "transip-md-checkpoint"))
    return in_quotes(path) +
        " is a transip-md training checkpoint, not an exported model: export it first with "
        "python -m transip_md.export " + path + " model.pt";
  if (pickle)
    return in_quotes(path) +
        " is a torch.save() file (pickled tensors or a state dict), not an exported "
        "TorchScript model; " + needs +
        " (a transip-md checkpoint is exported with python -m transip_md.export CHECKPOINT "
        "model.pt)";
  return in_quotes(path) + " is a zip file but not a TorchScript archive (no code/ or data.pkl "
      "entries); " + needs;
}

// What a path that is no regular file is, as words following "is" (file_kinds.not_a_file).
std::string file_type_words(mode_t mode)
{
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO (named pipe)";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  return "not a regular file";
}

// ---------------------------------------------------------------- archive integrity
// torch::jit::load checks neither the zip CRC-32 of a member nor whether a tensor record has
// the size data.pkl gives it (issue #18): a flipped bit in the weights loads and computes other
// numbers, records of another dtype are read past their end. These checks run first; the
// Python door (transip_md/file_kinds.py, archive_damage) makes the same ones, in the same words.

// CRC-32 as zip computes it (the reflected polynomial 0xEDB88320), continuing from `crc`.
uint32_t crc32_update(uint32_t crc, const unsigned char *p, size_t n)
{
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ p[i]) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

// A member's name without the archive's root folder ("data/14"), as messages show it.
std::string member_name(const std::string &name)
{
  const size_t slash = name.find('/');
  return slash == std::string::npos ? name : name.substr(slash + 1);
}

// Offset of a member's bytes (after its local header), or npos if the local header is not one
// or names another member (Python's zipfile refuses both).
uint64_t member_data_offset(std::FILE *fp, const ZipEntry &e)
{
  std::vector<unsigned char> head, name;
  if (!read_at(fp, e.local_offset, 30, head) || le(head.data(), 4) != 0x04034b50)
    return std::string::npos;
  const uint64_t name_len = le(&head[26], 2), extra_len = le(&head[28], 2);
  if (!read_at(fp, e.local_offset + 30, name_len, name) ||
      std::string(name.begin(), name.end()) != e.name)
    return std::string::npos;
  return e.local_offset + 30 + name_len + extra_len;
}

// Reads members, stored ones from the file, deflated ones (torch deflates code/) through
// torch's own zip reader, opened at the first need; nullptr if it cannot open the archive.
class MemberReader {
 public:
  MemberReader(std::FILE *fp, const std::string &path) : fp_(fp), path_(path) {}

  // "" if the member's bytes pass its CRC-32, else the words that follow "<path> is damaged: ".
  std::string crc_problem(const ZipEntry &e)
  {
    const std::string name = member_name(e.name);
    if (e.method == 0) {
      const uint64_t start = member_data_offset(fp_, e);
      if (start == std::string::npos)
        return "the local header of its member " + name + " is damaged";
      if (e.usize != e.size) return "its member " + name + " has two different sizes";
      if (start + e.size > file_size()) return "its member " + name + " runs past the end of "
                                               "the file (truncated?)";
      uint32_t crc = 0;
      std::vector<unsigned char> chunk;
      for (uint64_t done = 0; done < e.size;) {
        const size_t n = static_cast<size_t>(std::min<uint64_t>(e.size - done, 1u << 20));
        if (!read_at(fp_, start + done, n, chunk))
          return "its member " + name + " does not read back";
        crc = crc32_update(crc, chunk.data(), n);
        done += n;
      }
      return crc == e.crc ? "" : bad_crc(name);
    }
    if (e.method != 8)
      return "its member " + name + " uses zip compression method " + std::to_string(e.method) +
          ", which PyTorch files never use";
    // deflate never shrinks data by more than 1032:1: a bigger claim is a damaged size field,
    // and would have the reader allocate it
    if (e.usize > e.size * 1032 + 1024)
      return "its member " + name + " claims " + std::to_string(e.usize) + " bytes from " +
          std::to_string(e.size) + " compressed ones";
    std::vector<unsigned char> data;
    std::string why;
    if (!inflated(e, data, why)) return why;
    return crc32_update(0, data.data(), data.size()) == e.crc ? "" : bad_crc(name);
  }

  // The member's uncompressed bytes; false (and `why`, "" when torch's reader cannot open the
  // archive at all: torch::jit::load then says why) if they cannot be had.
  bool bytes(const ZipEntry &e, std::vector<unsigned char> &data, std::string &why)
  {
    if (e.method == 0) {
      const uint64_t start = member_data_offset(fp_, e);
      why = "its member " + member_name(e.name) + " does not read back";
      return start != std::string::npos && e.size < (uint64_t(1) << 31) &&
          read_at(fp_, start, e.size, data);
    }
    return inflated(e, data, why);
  }

 private:
  std::string bad_crc(const std::string &name) const
  {
    return "its member " + name + " fails the zip CRC-32 check (corrupted on disk or in "
        "transfer?)";
  }

  uint64_t file_size()
  {
    if (size_ == 0 && fseeko(fp_, 0, SEEK_END) == 0) size_ = static_cast<uint64_t>(ftello(fp_));
    return size_;
  }

  bool inflated(const ZipEntry &e, std::vector<unsigned char> &data, std::string &why)
  {
    why.clear();
    if (!opened_) {
      opened_ = true;
      try {
        torch_reader_ = std::make_unique<caffe2::serialize::PyTorchStreamReader>(path_);
      } catch (const std::exception &) {
        torch_reader_.reset();    // torch::jit::load will fail on it and say why
      }
    }
    if (!torch_reader_) return false;
    try {
      auto record = torch_reader_->getRecord(member_name(e.name));
      const auto *p = static_cast<const unsigned char *>(std::get<0>(record).get());
      data.assign(p, p + std::get<1>(record));
      return true;
    } catch (const std::exception &ex) {
      why = "its member " + member_name(e.name) + " does not inflate (" +
          last_line_of(error_text(ex)) + ")";
      return false;
    }
  }

  std::FILE *fp_;
  std::string path_;
  uint64_t size_ = 0;
  bool opened_ = false;
  std::unique_ptr<caffe2::serialize::PyTorchStreamReader> torch_reader_;
};

// ---------------------------------------------------------------- data.pkl, scanned
// What data.pkl says of the tensor records, read without unpickling anything: the records
// (BINPERSID ('storage', torch.<Kind>Storage, key, location, numel)) and the tensor views on
// them (torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)). A stack machine
// over the opcodes torch's pickler writes; every object is opaque.
struct PickleItem {
  enum Kind { OTHER, MARK, INT, STRING, GLOBAL, TUPLE, STORAGE } kind = OTHER;
  int64_t number = 0;                              // INT; STORAGE: index in storages
  std::string text, name;                          // STRING; GLOBAL: module, name
  std::vector<std::shared_ptr<PickleItem>> items;  // TUPLE
};
using PickleRef = std::shared_ptr<PickleItem>;

struct StorageRecord {
  std::string kind, key;
  int64_t numel;
};
struct TensorView {
  size_t storage;
  int64_t offset;
  std::vector<int64_t> size, stride;
};
struct PickleScan {
  std::vector<StorageRecord> storages;
  std::vector<TensorView> views;
};

// false: not a pickle this scan follows (then torch decides, as in the Python door).
bool scan_pickle(const std::vector<unsigned char> &pkl, PickleScan &out)
{
  std::vector<PickleRef> stack;
  std::unordered_map<uint64_t, PickleRef> memo;
  size_t p = 0;
  auto item = [](PickleItem::Kind kind) {
    auto it = std::make_shared<PickleItem>();
    it->kind = kind;
    return it;
  };
  auto has = [&](size_t n) { return n <= pkl.size() && p <= pkl.size() - n; };
  auto uint_at = [&](size_t n, uint64_t &v) {
    if (!has(n)) return false;
    v = le(&pkl[p], static_cast<int>(n));
    p += n;
    return true;
  };
  auto pop = [&](PickleRef &v) {
    if (stack.empty() || stack.back()->kind == PickleItem::MARK) return false;
    v = stack.back();
    stack.pop_back();
    return true;
  };
  auto pop_to_mark = [&](std::vector<PickleRef> &items) {
    size_t k = stack.size();
    while (k > 0 && stack[k - 1]->kind != PickleItem::MARK) --k;
    if (k == 0) return false;
    items.assign(stack.begin() + static_cast<long>(k), stack.end());
    stack.resize(k - 1);
    return true;
  };
  auto line = [&](std::string &text) {
    const auto end = std::find(pkl.begin() + static_cast<long>(p), pkl.end(), '\n');
    if (end == pkl.end()) return false;
    text.assign(pkl.begin() + static_cast<long>(p), end);
    p = static_cast<size_t>(end - pkl.begin()) + 1;
    return true;
  };
  auto tuple_of = [&](std::vector<PickleRef> items) {
    auto t = item(PickleItem::TUPLE);
    t->items = std::move(items);
    stack.push_back(t);
  };
  auto int_items = [](const PickleRef &t, std::vector<int64_t> &values) {
    if (t->kind != PickleItem::TUPLE) return false;
    values.clear();
    for (const auto &v : t->items) {
      if (v->kind != PickleItem::INT) return false;
      values.push_back(v->number);
    }
    return true;
  };
  const size_t kMaxStack = 1u << 20;
  while (p < pkl.size()) {
    if (stack.size() > kMaxStack) return false;
    const unsigned char op = pkl[p++];
    uint64_t n = 0;
    PickleRef a, b;
    std::vector<PickleRef> items;
    switch (op) {
      case 0x80: if (!uint_at(1, n)) return false; break;                       // PROTO
      case 0x95: if (!uint_at(8, n)) return false; break;                       // FRAME
      case '.': return stack.size() == 1;                                        // STOP
      case '(': stack.push_back(item(PickleItem::MARK)); break;
      case '0': if (!pop(a)) return false; break;                                // POP
      case '1': if (!pop_to_mark(items)) return false; break;                    // POP_MARK
      case '2': if (stack.empty()) return false; stack.push_back(stack.back()); break;  // DUP
      case 'N': case 0x88: case 0x89: stack.push_back(item(PickleItem::OTHER)); break;
      case 'J': case 'K': case 'M': case 0x8a: {                                 // integers
        const size_t bytes = op == 'J' ? 4 : op == 'K' ? 1 : op == 'M' ? 2 : 0;
        size_t len = bytes;
        if (op == 0x8a) {                                                        // LONG1
          if (!uint_at(1, n)) return false;
          len = static_cast<size_t>(n);
        }
        if (!has(len)) return false;
        auto v = item(len <= 8 ? PickleItem::INT : PickleItem::OTHER);
        if (len > 0 && len <= 8) {
          uint64_t u = le(&pkl[p], static_cast<int>(len));
          const bool is_signed = op == 'J' || op == 0x8a;
          if (is_signed && len < 8 && (u >> (8 * len - 1)) & 1u) u |= ~uint64_t(0) << (8 * len);
          v->number = static_cast<int64_t>(u);
        }
        p += len;
        stack.push_back(v);
        break;
      }
      case 'G': if (!uint_at(8, n)) return false; stack.push_back(item(PickleItem::OTHER)); break;
      case 'X': case 0x8c: case 0x8d: case 'T': case 'U':                        // strings
      case 'B': case 'C': case 0x8e: {                                           // bytes
        const size_t width = (op == 0x8c || op == 'U' || op == 'C') ? 1
                             : (op == 0x8d || op == 0x8e) ? 8 : 4;
        if (!uint_at(width, n) || !has(static_cast<size_t>(n))) return false;
        const bool text = !(op == 'B' || op == 'C' || op == 0x8e);
        auto v = item(text ? PickleItem::STRING : PickleItem::OTHER);
        if (text) v->text.assign(pkl.begin() + static_cast<long>(p),
                                 pkl.begin() + static_cast<long>(p + n));
        p += static_cast<size_t>(n);
        stack.push_back(v);
        break;
      }
      case 'c': {                                                                // GLOBAL
        auto g = item(PickleItem::GLOBAL);
        if (!line(g->text) || !line(g->name)) return false;
        stack.push_back(g);
        break;
      }
      case 0x93: {                                                               // STACK_GLOBAL
        if (!pop(b) || !pop(a) || a->kind != PickleItem::STRING || b->kind != PickleItem::STRING)
          return false;
        auto g = item(PickleItem::GLOBAL);
        g->text = a->text;
        g->name = b->text;
        stack.push_back(g);
        break;
      }
      case ')': tuple_of({}); break;                                             // EMPTY_TUPLE
      case 't': if (!pop_to_mark(items)) return false; tuple_of(items); break;   // TUPLE
      case 0x85: case 0x86: case 0x87: {                                         // TUPLE1..3
        items.resize(static_cast<size_t>(op - 0x84));
        for (size_t k = items.size(); k > 0; --k)
          if (!pop(items[k - 1])) return false;
        tuple_of(items);
        break;
      }
      case ']': case '}': case 0x8f: stack.push_back(item(PickleItem::OTHER)); break;
      case 'l': case 'd': case 0x91:                                             // LIST DICT FROZENSET
        if (!pop_to_mark(items)) return false;
        stack.push_back(item(PickleItem::OTHER));
        break;
      case 'a': if (!pop(a) || stack.empty()) return false; break;               // APPEND
      case 's': if (!pop(a) || !pop(b) || stack.empty()) return false; break;    // SETITEM
      case 'e': case 'u': case 0x90:                                             // APPENDS SETITEMS ADDITEMS
        if (!pop_to_mark(items) || stack.empty()) return false;
        break;
      case 'q': case 'r': case 0x94: {                                           // BINPUT, MEMOIZE
        if (op == 'q' && !uint_at(1, n)) return false;
        if (op == 'r' && !uint_at(4, n)) return false;
        if (op == 0x94) n = memo.size();
        if (stack.empty() || memo.size() > kMaxStack) return false;
        memo[n] = stack.back();
        break;
      }
      case 'h': case 'j': {                                                      // BINGET
        if (!uint_at(op == 'h' ? 1 : 4, n)) return false;
        const auto found = memo.find(n);
        if (found == memo.end()) return false;
        stack.push_back(found->second);
        break;
      }
      case 'Q': {                                                                // BINPERSID
        if (!pop(a) || a->kind != PickleItem::TUPLE || a->items.size() != 5) return false;
        const auto &f = a->items;
        if (f[0]->kind != PickleItem::STRING || f[0]->text != "storage" ||
            f[1]->kind != PickleItem::GLOBAL || f[4]->kind != PickleItem::INT ||
            (f[2]->kind != PickleItem::STRING && f[2]->kind != PickleItem::INT))
          return false;
        StorageRecord rec;
        rec.kind = f[1]->name;
        rec.key = f[2]->kind == PickleItem::STRING ? f[2]->text : std::to_string(f[2]->number);
        rec.numel = f[4]->number;
        auto s = item(PickleItem::STORAGE);
        s->number = static_cast<int64_t>(out.storages.size());
        out.storages.push_back(rec);
        stack.push_back(s);
        break;
      }
      case 'R': {                                                                // REDUCE
        if (!pop(b) || !pop(a)) return false;
        if (a->kind == PickleItem::GLOBAL && a->text == "torch._utils" &&
            a->name == "_rebuild_tensor_v2") {
          if (b->kind != PickleItem::TUPLE || b->items.size() < 4) return false;
          TensorView view;
          if (b->items[1]->kind != PickleItem::INT || !int_items(b->items[2], view.size) ||
              !int_items(b->items[3], view.stride))
            return false;
          view.offset = b->items[1]->number;
          if (b->items[0]->kind == PickleItem::STORAGE) {
            view.storage = static_cast<size_t>(b->items[0]->number);
            out.views.push_back(view);
          }
        }
        stack.push_back(item(PickleItem::OTHER));
        break;
      }
      case 0x81: if (!pop(b) || !pop(a)) return false;                           // NEWOBJ
        stack.push_back(item(PickleItem::OTHER));
        break;
      case 'b': if (!pop(a) || stack.empty()) return false; break;               // BUILD
      default: return false;    // an opcode torch's pickler does not write
    }
  }
  return false;    // no STOP
}

// Bytes per element of the storage classes torch pickles (file_kinds._ELEMENT_BYTES).
int64_t element_bytes(const std::string &kind)
{
  static const std::map<std::string, int64_t> sizes = {
      {"DoubleStorage", 8}, {"FloatStorage", 4}, {"HalfStorage", 2}, {"BFloat16Storage", 2},
      {"LongStorage", 8}, {"IntStorage", 4}, {"ShortStorage", 2}, {"CharStorage", 1},
      {"ByteStorage", 1}, {"BoolStorage", 1}, {"ComplexDoubleStorage", 16},
      {"ComplexFloatStorage", 8}, {"UntypedStorage", 1}};
  const auto it = sizes.find(kind);
  return it == sizes.end() ? 0 : it->second;
}

// Whether every tensor record has the size data.pkl gives it and every tensor fits in its
// record (file_kinds.storage_mismatch); "" if so or if the scan cannot follow data.pkl.
std::string record_problem(const std::vector<ZipEntry> &entries, MemberReader &members)
{
  const ZipEntry *pickle = nullptr;
  for (const ZipEntry &e : entries)
    if (ends_with(e.name, "/data.pkl") && e.name.find('/') == e.name.size() - 9) {
      pickle = &e;
      break;
    }
  if (!pickle) return "";
  const std::string root = pickle->name.substr(0, pickle->name.size() - 9);
  std::vector<unsigned char> pkl;
  std::string why;
  PickleScan scan;
  if (!members.bytes(*pickle, pkl, why) || !scan_pickle(pkl, scan)) return "";
  std::map<std::string, uint64_t> sizes;
  for (const ZipEntry &e : entries) sizes.emplace(e.name, e.usize);
  for (const StorageRecord &rec : scan.storages) {
    const auto found = sizes.find(root + "/data/" + rec.key);
    if (found == sizes.end()) return "its tensor record data/" + rec.key + " is missing";
    const int64_t element = element_bytes(rec.kind);
    if (element > 0 && (rec.numel < 0 || found->second != static_cast<uint64_t>(rec.numel) *
                                                              static_cast<uint64_t>(element)))
      return "its tensor record data/" + rec.key + " holds " + std::to_string(found->second) +
          " bytes where data.pkl expects " + std::to_string(rec.numel) + " x " +
          std::to_string(element) + " (" + rec.kind + "); records from another file?";
  }
  for (const TensorView &v : scan.views) {
    if (v.size.size() != v.stride.size()) continue;
    if (std::any_of(v.size.begin(), v.size.end(), [](int64_t n) { return n == 0; })) continue;
    const StorageRecord &rec = scan.storages[v.storage];
    // in double: a damaged size or stride must not overflow the sum
    double end = static_cast<double>(v.offset) + 1.0;
    for (size_t k = 0; k < v.size.size(); ++k)
      end += static_cast<double>(v.size[k] - 1) * std::fabs(static_cast<double>(v.stride[k]));
    if (v.offset < 0 || end > static_cast<double>(rec.numel)) {
      std::string shape;
      for (int64_t n : v.size) shape += (shape.empty() ? "" : ", ") + std::to_string(n);
      return "a tensor of shape [" + shape + "] reaches element " + number_text(end) +
          " of its record data/" + rec.key + ", which holds " + std::to_string(rec.numel);
    }
  }
  return "";
}

/* Why a TorchScript archive is damaged ("" if it is not): a name twice, a member failing its
   CRC-32, a tensor record of another size than data.pkl says. Reads the whole file once. */
std::string archive_damage(std::FILE *fp, const std::string &path)
{
  std::vector<ZipEntry> entries;
  if (read_zip_directory(fp, entries) != ZipStatus::OK) return "";    // archive_problem's
  std::set<std::string> seen;
  for (const ZipEntry &e : entries)
    if (!seen.insert(e.name).second)
      return "its archive holds " + member_name(e.name) + " more than once";
  MemberReader members(fp, path);
  for (const ZipEntry &e : entries) {
    const std::string problem = members.crc_problem(e);
    if (!problem.empty()) return problem;
  }
  return record_problem(entries, members);
}

// ---------------------------------------------------------------- the weights digest
// SHA-1 (FIPS 180-4), streamed: the digest the exporter records (transip_md/export/
// weights_digest.py; byte layout in export/CONTRACT.md, "The weights digest").
class Sha1 {
 public:
  void update(const void *data, size_t n)
  {
    const auto *p = static_cast<const unsigned char *>(data);
    bytes_ += n;
    while (n > 0) {
      const size_t take = std::min(n, sizeof(block_) - used_);
      std::memcpy(block_ + used_, p, take);
      used_ += take;
      p += take;
      n -= take;
      if (used_ == sizeof(block_)) {
        compress();
        used_ = 0;
      }
    }
  }

  std::string hex()
  {
    const uint64_t bits = bytes_ * 8;
    const unsigned char one = 0x80, zero = 0;
    update(&one, 1);
    while (used_ != 56) update(&zero, 1);
    unsigned char length[8];
    for (int k = 0; k < 8; ++k) length[k] = static_cast<unsigned char>(bits >> (56 - 8 * k));
    update(length, 8);
    char out[41];
    for (int k = 0; k < 5; ++k) std::snprintf(out + 8 * k, 9, "%08x", h_[k]);
    return std::string(out, 40);
  }

 private:
  static uint32_t rotl(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

  void compress()
  {
    uint32_t w[80];
    for (int t = 0; t < 16; ++t)
      w[t] = uint32_t(block_[4 * t]) << 24 | uint32_t(block_[4 * t + 1]) << 16 |
             uint32_t(block_[4 * t + 2]) << 8 | uint32_t(block_[4 * t + 3]);
    for (int t = 16; t < 80; ++t) w[t] = rotl(w[t - 3] ^ w[t - 8] ^ w[t - 14] ^ w[t - 16], 1);
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4];
    for (int t = 0; t < 80; ++t) {
      uint32_t f, k;
      if (t < 20) f = (b & c) | (~b & d), k = 0x5A827999u;
      else if (t < 40) f = b ^ c ^ d, k = 0x6ED9EBA1u;
      else if (t < 60) f = (b & c) | (b & d) | (c & d), k = 0x8F1BBCDCu;
      else f = b ^ c ^ d, k = 0xCA62C1D6u;
      const uint32_t next = rotl(a, 5) + f + e + k + w[t];
      e = d;
      d = c;
      c = rotl(b, 30);
      b = a;
      a = next;
    }
    h_[0] += a, h_[1] += b, h_[2] += c, h_[3] += d, h_[4] += e;
  }

  uint32_t h_[5] = {0x67452301u, 0xEFCDAB89u, 0x98BADCFEu, 0x10325476u, 0xC3D2E1F0u};
  unsigned char block_[64] = {};
  size_t used_ = 0;
  uint64_t bytes_ = 0;
};

// torch's Python name of a dtype, without "torch." ("" for one the digest does not cover).
std::string dtype_python_name(c10::ScalarType t)
{
  switch (t) {
    case c10::kDouble: return "float64";
    case c10::kFloat: return "float32";
    case c10::kHalf: return "float16";
    case c10::kBFloat16: return "bfloat16";
    case c10::kLong: return "int64";
    case c10::kInt: return "int32";
    case c10::kShort: return "int16";
    case c10::kChar: return "int8";
    case c10::kByte: return "uint8";
    case c10::kBool: return "bool";
    case c10::kComplexFloat: return "complex64";
    case c10::kComplexDouble: return "complex128";
    default: return "";
  }
}

// Every parameter and buffer by dotted name, in name order (the digest's order).
std::map<std::string, at::Tensor> named_weights(const torch::jit::Module &module)
{
  std::map<std::string, at::Tensor> out;
  for (const auto &p : module.named_parameters(true)) out[p.name] = p.value;
  for (const auto &b : module.named_buffers(true)) out[b.name] = b.value;
  return out;
}

// "sha1:<hex>" of the weights, or "" with `unsupported` set to a tensor of a dtype it skips.
std::string weights_digest(const std::map<std::string, at::Tensor> &weights,
                           std::string &unsupported)
{
  Sha1 sha;
  for (const auto &w : weights) {
    const at::Tensor t = w.second.detach().to(torch::kCPU).contiguous();
    const std::string dtype = dtype_python_name(t.scalar_type());
    if (dtype.empty()) {
      unsupported = w.first + " (" + std::string(c10::toString(t.scalar_type())) + ")";
      return "";
    }
    std::string shape;
    for (int64_t n : t.sizes()) shape += (shape.empty() ? "" : ",") + std::to_string(n);
    const size_t nbytes = static_cast<size_t>(t.numel()) * t.element_size();
    const std::string header = w.first + " " + dtype + " [" + shape + "] " +
        std::to_string(nbytes) + "\n";
    sha.update(header.data(), header.size());
    if (nbytes > 0) sha.update(t.data_ptr(), nbytes);
  }
  return "sha1:" + sha.hex();
}

// The format-3 entry points a format <= 2 file is probed for (export/CONTRACT.md, section 2).
const char *const KNOWN_ENTRY_POINTS[] = {
    "compute",          "forward",           "energy",        "energy_static",
    "local_energies_forces", "mapped_energies_forces_virial", "halo_feature_width",
    "halo_edges",       "halo_embed",        "halo_layer",    "halo_readout",
    "element_list",     "validate",          "validate_cell", "validate_electrons"};

std::string old_name_of(const std::string &entry)
{
  for (const auto &alias : kFormat2Aliases)
    if (alias.first == entry) return alias.second;
  return "";
}

const std::string REEXPORT = "re-export it with python -m transip_md.export";

}    // namespace

// ---------------------------------------------------------------- elements
const char *element_symbol(int z)
{
  return (z >= 1 && z <= kMaxAtomicNumber) ? ELEMENT_SYMBOLS[z] : "";
}

int atomic_number(const std::string &symbol)
{
  for (int z = 1; z <= kMaxAtomicNumber; ++z)
    if (symbol == ELEMENT_SYMBOLS[z]) return z;
  return 0;
}

int atomic_number_any_case(const std::string &symbol)
{
  const std::string want = lower(symbol);
  for (int z = 1; z <= kMaxAtomicNumber; ++z)
    if (want == lower(ELEMENT_SYMBOLS[z])) return z;
  return 0;
}

double standard_mass(int z)
{
  return (z >= 1 && z <= kMaxAtomicNumber) ? STANDARD_MASSES[z] : 0.0;
}

// ---------------------------------------------------------------- errors of the model
std::string error_text(const std::exception &e)
{
  if (auto *c10e = dynamic_cast<const c10::Error *>(&e)) return c10e->what_without_backtrace();
  return e.what();
}

std::string last_line_of(const std::string &text)
{
  std::istringstream in(text);
  std::string line, last;
  while (std::getline(in, line)) {
    const auto first = line.find_first_not_of(" \t\r");
    if (first == std::string::npos) continue;
    // c10 appends its own C++ backtrace after "Exception raised from"; stop there.
    if (line.compare(first, 21, "Exception raised from") == 0) break;
    const auto end = line.find_last_not_of(" \t\r");
    last = line.substr(first, end - first + 1);
  }
  const std::string prefix = "builtins.";
  if (last.compare(0, prefix.size(), prefix) == 0) last = last.substr(prefix.size());
  return last.empty() ? text : last;
}

std::string without_value_error(const std::string &text)
{
  const std::string prefix = "ValueError: ";
  return text.compare(0, prefix.size(), prefix) == 0 ? text.substr(prefix.size()) : text;
}

ModelMessage split_atom_rows(const std::string &message)
{
  ModelMessage out{message, {}};
  const size_t end = message.find_last_not_of(" \t\r\n");
  if (end == std::string::npos || message[end] != ']') return out;
  const std::string tag = "[atom rows:";
  const size_t at = message.rfind(tag, end);
  if (at == std::string::npos) return out;
  std::vector<int64_t> rows;
  size_t k = at + tag.size();
  while (k < end) {    // " i j ...": each row one space, then digits
    if (message[k] != ' ' || k + 1 >= end ||
        !std::isdigit(static_cast<unsigned char>(message[k + 1])))
      return out;
    ++k;
    int64_t row = 0;
    while (k < end && std::isdigit(static_cast<unsigned char>(message[k])))
      row = row * 10 + (message[k++] - '0');
    rows.push_back(row);
  }
  if (rows.empty()) return out;
  const size_t before = message.find_last_not_of(" \t\r\n", at == 0 ? 0 : at - 1);
  out.text = (at == 0 || before == std::string::npos) ? "" : message.substr(0, before + 1);
  out.rows = rows;
  return out;
}

ModelMessage translate_model_error(const std::exception &e)
{
  return split_atom_rows(last_line_of(error_text(e)));
}

// ---------------------------------------------------------------- operator libraries
// A fused export (python -m transip_md.export --kernels fused) calls the operator
// transip_ops::neighbor_attention of the library libtransip_ops.so; its code resolves the
// operator while torch::jit::load compiles it, so the library is loaded before that, from
// $TRANSIP_OPS_LIBRARY or else the path this program was built with (TRANSIP_OPS_LIBRARY_PATH,
// set by transip_md/lammps/build.py and export/check/build.py, which build the library).
namespace {

const char *const kOpsLibrary = "transip_ops";
const char *const kOpsOperator = "transip_ops::neighbor_attention";
const char *const kOpsEnv = "TRANSIP_OPS_LIBRARY";
#ifdef TRANSIP_OPS_LIBRARY_PATH
const char *const kOpsBuiltPath = TRANSIP_OPS_LIBRARY_PATH;
#else
const char *const kOpsBuiltPath = "";
#endif

bool operator_registered(const char *name)
{
  return c10::Dispatcher::singleton().findSchema({name, ""}).has_value();
}

// The operator_library of the archive's extra/metadata.json (a stored entry, the exporter's
// JSON text), "" if the file declares none or the record cannot be read: the checks after
// torch::jit::load then judge the file as before.
std::string declared_operator_library(const std::string &path)
{
  std::FILE *fp = std::fopen(path.c_str(), "rb");
  if (!fp) return "";
  std::vector<ZipEntry> entries;
  std::string library;
  if (read_zip_directory(fp, entries) == ZipStatus::OK) {
    for (const ZipEntry &e : entries) {
      if (!ends_with(e.name, "/extra/metadata.json") || e.method != 0 ||
          e.size > (uint64_t(1) << 26))
        continue;
      std::vector<unsigned char> head, data;
      if (!read_at(fp, e.local_offset, 30, head) || le(head.data(), 4) != 0x04034b50) break;
      const uint64_t start = e.local_offset + 30 + le(&head[26], 2) + le(&head[28], 2);
      if (read_at(fp, start, e.size, data))
        json_string_at(std::string(data.begin(), data.end()), {"operator_library"}, library);
      break;
    }
  }
  std::fclose(fp);
  return library;
}

// Loads libtransip_ops.so for the model file `path` unless its operator is registered already.
void load_operator_library(const std::string &path, const Reader &reader)
{
  if (operator_registered(kOpsOperator)) return;
  const char *env = std::getenv(kOpsEnv);
  const bool from_env = env && *env;
  const std::string library = from_env ? env : kOpsBuiltPath;
  const std::string what_to_do =
      "; set " + std::string(kOpsEnv) + " to a libtransip_ops.so built for this libtorch "
      "(python -c 'import transip_md.ops as o; print(o.library_path())' builds one and prints "
      "its path), or export the reference path, which needs no library: python -m "
      "transip_md.export <checkpoint> model.pt --kernels reference";
  if (library.empty())
    throw ModelFileError(in_quotes(path) + " is a fused export: it needs the operator library '" +
                         kOpsLibrary + "', and " + reader.program + " was built without a path to "
                         "it and " + kOpsEnv + " is not set" + what_to_do);
  const std::string source = from_env ? std::string("$") + kOpsEnv : "the path built in";
  if (!dlopen(library.c_str(), RTLD_NOW | RTLD_GLOBAL)) {
    const char *why = dlerror();
    throw ModelFileError(in_quotes(path) + " is a fused export: it needs the operator library '" +
                         kOpsLibrary + "', which could not be loaded from " + in_quotes(library) +
                         " (" + source + "): " + (why ? why : "dlopen failed") + what_to_do);
  }
  if (!operator_registered(kOpsOperator))
    throw ModelFileError(in_quotes(path) + " needs the operator " + kOpsOperator + ", but " +
                         in_quotes(library) + " (" + source + ") does not register it (not a "
                         "transip_ops library of this transip-md)" + what_to_do);
}

}    // namespace

std::vector<std::string> loaded_operator_libraries()
{
  if (operator_registered(kOpsOperator)) return {kOpsLibrary};
  return {};
}

// ---------------------------------------------------------------- the file
Model Model::load(const std::string &path, const torch::Device &device, const Reader &reader)
{
  struct stat st {};
  if (stat(path.c_str(), &st) != 0)
    throw ModelFileError("cannot open model file " + in_quotes(path) + ": " + std::strerror(errno));
  // a FIFO would block the open (and the program) until a writer comes: refuse what is no
  // regular file before opening it, in the words of transip_md/file_kinds.py (not_a_file)
  if (!S_ISREG(st.st_mode))
    throw ModelFileError("model path " + in_quotes(path) + " is " + file_type_words(st.st_mode) +
                         ", not a model file");
  // O_NONBLOCK: should the path have become a FIFO since stat(), open() must not wait either
  const int fd = open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0)
    throw ModelFileError("cannot open model file " + in_quotes(path) + ": " + std::strerror(errno));
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    close(fd);
    throw ModelFileError("model path " + in_quotes(path) + " is " + file_type_words(st.st_mode) +
                         ", not a model file");
  }
  std::FILE *fp = fdopen(fd, "rb");
  if (!fp) {
    close(fd);
    throw ModelFileError("cannot open model file " + in_quotes(path) + ": " + std::strerror(errno));
  }
  // files torch::jit::load would refuse with an obscure message (a training checkpoint gets
  // "constants.pkl not found"): say what they are; then what torch does not check (CRC-32s,
  // tensor record sizes)
  std::string problem = archive_problem(fp, path, reader);
  if (problem.empty()) {
    const std::string damage = archive_damage(fp, path);
    if (!damage.empty())
      problem = in_quotes(path) + " is damaged: " + damage +
          "; copy it again or export the model again (python -m transip_md.export)";
  }
  std::fclose(fp);
  if (!problem.empty()) throw ModelFileError(problem);

  if (declared_operator_library(path) == kOpsLibrary) load_operator_library(path, reader);

  Model m;
  m.path_ = path;
  try {
    m.module_ = torch::jit::load(path, device);
  } catch (const std::exception &e) {
    throw ModelFileError(in_quotes(path) +
                         " is not a loadable TorchScript model file (corrupt, truncated, or not "
                         "written by torch.jit.save / python -m transip_md.export): " +
                         last_line_of(error_text(e)));
  }
  torch::jit::Module &mod = m.module_;
  if (!mod.hasattr("format_version") || !mod.attr("format_version").isInt())
    throw ModelFileError(in_quotes(path) +
                         " is a TorchScript file but not an exported transip-md model (it has "
                         "no integer attribute format_version)");
  m.format_version_ = mod.attr("format_version").toInt();
  if (m.format_version_ < 1)
    throw ModelFileError(in_quotes(path) + " has format_version " +
                         std::to_string(m.format_version_) +
                         ": it is a scripted model but not an exported one; export it with "
                         "python -m transip_md.export");
  if (m.format_version_ > kMaxFormatVersion)
    throw ModelFileError(in_quotes(path) + " has format_version " +
                         std::to_string(m.format_version_) + " but " + reader.self +
                         " reads format_version <= " + std::to_string(kMaxFormatVersion) +
                         " (the file is newer); rebuild " + reader.program +
                         " from the transip-md that exported the model (" + reader.rebuild + ")");

  if (mod.hasattr("metadata_json") && mod.attr("metadata_json").isString())
    json_string_at(mod.attr("metadata_json").toStringRef(), {"torch_version"}, m.torch_version_);
  if (m.format_version_ >= 3) {
    m.read_declaration();
  } else {
    m.probe_declaration();
  }
  m.check_declaration(reader);
  m.check_weights();

  m.dtype_ = torch::kFloat64;
  for (const auto &p : mod.parameters()) {
    if (!p.is_floating_point()) continue;
    m.dtype_ = p.scalar_type();
    break;
  }
  mod.eval();
  return m;
}

// Format 3: the declaration attributes (export/CONTRACT.md, section 2).
void Model::read_declaration()
{
  declared_ = true;
  auto dict = [&](const char *name) {
    if (!module_.hasattr(name) || !module_.attr(name).isGenericDict())
      throw ModelFileError(in_quotes(path_) + " has format_version " +
                           std::to_string(format_version_) + " but no declaration attribute '" +
                           name + "' (damaged, or not written by the exporter); " + REEXPORT);
    return module_.attr(name).toGenericDict();
  };
  try {
    for (const auto &kv : dict("capabilities"))
      capabilities_[kv.key().toStringRef()] = kv.value().toInt();
    for (const auto &kv : dict("limits")) limits_[kv.key().toStringRef()] = kv.value().toDouble();
    for (const auto &kv : dict("species")) species_[kv.key().toStringRef()] = kv.value().toInt();
    for (const auto &kv : dict("unit_factors")) {
      unit_factors_[kv.key().toStringRef()] = kv.value().toDouble();
      unit_sources_[kv.key().toStringRef()] = "unit_factors." + kv.key().toStringRef();
    }
  } catch (const ModelFileError &) {
    throw;
  } catch (const std::exception &e) {
    throw ModelFileError(in_quotes(path_) + " has a declaration of the wrong type (" +
                         last_line_of(error_text(e)) + "); " + REEXPORT);
  }
  if (!module_.hasattr("operator_library") || !module_.attr("operator_library").isString())
    throw ModelFileError(in_quotes(path_) +
                         " has no declaration attribute 'operator_library' (damaged, or not "
                         "written by the exporter); " + REEXPORT);
  operator_library_ = module_.attr("operator_library").toStringRef();
  for (const auto &cap : capabilities_) {
    const std::string old = old_name_of(cap.first);
    if (module_.find_method(cap.first)) {
      method_names_[cap.first] = cap.first;
    } else if (!old.empty() && module_.find_method(old)) {
      method_names_[cap.first] = old;
    } else {
      throw ModelFileError(in_quotes(path_) + " declares the entry point " + cap.first +
                           " but has no such method (damaged); " + REEXPORT);
    }
  }
}

// Format <= 2: no declaration; what the file offers is probed, its limits are attributes,
// its elements come from element_list(), its unit factors from metadata_json.
void Model::probe_declaration()
{
  declared_ = false;
  for (const char *name : {"cutoff", "num_layers", "receptive_field"})
    if (!module_.hasattr(name))
      throw ModelFileError(in_quotes(path_) +
                           " is a TorchScript file but not a TransIP model (it has no '" + name +
                           "' attribute)");
  if (!module_.find_method("element_list"))
    throw ModelFileError(in_quotes(path_) +
                         " is a TorchScript file but not a TransIP model (no element_list() "
                         "method)");
  for (const char *entry : KNOWN_ENTRY_POINTS) {
    const std::string old = old_name_of(entry);
    std::string found;
    if (module_.find_method(entry)) found = entry;
    else if (!old.empty() && module_.find_method(old)) found = old;
    if (found.empty()) continue;
    capabilities_[entry] = 1;
    method_names_[entry] = found;
  }
  try {
    limits_["cutoff"] = module_.attr("cutoff").toDouble();
    limits_["num_layers"] = static_cast<double>(module_.attr("num_layers").toInt());
    limits_["receptive_field"] = module_.attr("receptive_field").toDouble();
    // the model's own value where the file has it, else the constant of format <= 2
    limits_["max_images"] = module_.hasattr("max_images")
        ? static_cast<double>(module_.attr("max_images").toInt()) : 64.0;
    for (const char *name : {"min_pair_distance", "max_abs_charge", "max_multiplicity"})
      if (module_.hasattr(name)) {
        const c10::IValue v = module_.attr(name);
        limits_[name] = v.isInt() ? static_cast<double>(v.toInt()) : v.toDouble();
      }
  } catch (const std::exception &e) {
    throw ModelFileError(in_quotes(path_) + " has range attributes of the wrong type (" +
                         last_line_of(error_text(e)) + ")");
  }
  try {
    const c10::IValue symbols = module_.run_method("element_list");
    for (const auto &item : symbols.toListRef()) {
      const std::string &symbol = item.toStringRef();
      species_[symbol] = atomic_number(symbol);
    }
  } catch (const std::exception &e) {
    throw ModelFileError("element_list() of " + in_quotes(path_) +
                         " failed: " + last_line_of(error_text(e)));
  }
  if (module_.hasattr("metadata_json") && module_.attr("metadata_json").isString()) {
    const std::string &json = module_.attr("metadata_json").toStringRef();
    double value = 0.0;
    if (json_number_at(json, {"units", "openmm", "kj_per_mol_per_ev"}, value)) {
      unit_factors_["kj_per_mol_per_ev"] = value;
      unit_sources_["kj_per_mol_per_ev"] = "metadata units.openmm.kj_per_mol_per_ev";
    }
    if (json_number_at(json, {"units", "openmm", "angstrom_per_nm"}, value)) {
      unit_factors_["angstrom_per_nm"] = value;
      unit_sources_["angstrom_per_nm"] = "metadata units.openmm.angstrom_per_nm";
    }
    if (json_number_at(json, {"units", "lammps_real", "kcal_per_mol_per_ev"}, value)) {
      unit_factors_["kcal_per_mol_per_ev"] = value;
      unit_sources_["kcal_per_mol_per_ev"] = "metadata units.lammps_real.kcal_per_mol_per_ev";
    } else if (unit_factors_.count("kj_per_mol_per_ev")) {
      // Files exported before the lammps_real entry existed carry only OpenMM's kJ/mol factor.
      // 1 kcal = 4.184 kJ exactly (the thermochemical calorie, by definition; it is also the
      // kcal of LAMMPS' units real), so dividing by 4.184 adds no second physical constant.
      unit_factors_["kcal_per_mol_per_ev"] = unit_factors_["kj_per_mol_per_ev"] / 4.184;
      unit_sources_["kcal_per_mol_per_ev"] = "metadata units.openmm.kj_per_mol_per_ev / 4.184";
    }
  }
}

// What every file must satisfy, however it was read.
void Model::check_declaration(const Reader &reader)
{
  const double rc = limit("cutoff"), rf = limit("receptive_field"), layers = limit("num_layers");
  if (!(rc > 0.0) || !(layers >= 1.0) || !(rf >= rc) || !(limit("max_images") >= 1.0))
    throw ModelFileError(in_quotes(path_) + " declares an invalid range (cutoff " +
                         number_text(rc) + " Å, " + number_text(layers) +
                         " layers, receptive field " + number_text(rf) + " Å, max_images " +
                         number_text(limit("max_images")) + ")");
  if (species_.empty())
    throw ModelFileError("model " + in_quotes(path_) + " supports no elements");
  for (const auto &s : species_)
    if (atomic_number(s.first) == 0 || atomic_number(s.first) != s.second)
      throw ModelFileError(in_quotes(path_) + " declares the species " + s.first + " = " +
                           std::to_string(s.second) +
                           ", which is no chemical element (damaged); " + REEXPORT);
  // 1 eV = 96.49 kJ/mol = 23.06 kcal/mol, 1 nm = 10 Å: anything far from it is a damaged or
  // hand-edited record
  const struct {
    const char *name;
    double low, high, typical;
  } sane[] = {{"kj_per_mol_per_ev", 90.0, 100.0, 96.485},
              {"kcal_per_mol_per_ev", 20.0, 26.0, 23.06},
              {"angstrom_per_nm", 9.99, 10.01, 10.0}};
  for (const auto &s : sane) {
    const double v = unit_factor(s.name);
    if (unit_factors_.count(s.name) && !(v > s.low && v < s.high))
      throw ModelFileError(in_quotes(path_) + " gives " + unit_factor_source(s.name) + " = " +
                           number_text(v) + ", far from " + number_text(s.typical) +
                           "; the declaration is damaged: " + REEXPORT);
  }
  if (!operator_library_.empty()) {
    const auto loaded = loaded_operator_libraries();
    if (std::find(loaded.begin(), loaded.end(), operator_library_) == loaded.end())
      throw ModelFileError(in_quotes(path_) + " needs the operator library '" + operator_library_ +
                           "', which is not loaded in " + reader.program +
                           "; build " + reader.program +
                           " with transip-md's compiled operators (or set " + kOpsEnv +
                           "), or export the reference path (no operator library) with "
                           "python -m transip_md.export <checkpoint> model.pt --kernels "
                           "reference");
  }
  if (!torch_version_.empty()) {
    const std::string major = torch_version_.substr(0, torch_version_.find('.'));
    if (major != std::to_string(TORCH_VERSION_MAJOR))
      warnings_.push_back(in_quotes(path_) + " was exported with torch " + torch_version_ + ", " +
                          reader.program + " runs libtorch " + TORCH_VERSION +
                          " (another major version); re-export it if loading or results look "
                          "wrong");
  }
}

// The loaded weights: finite, and (files that record one) equal to the digest of the export.
void Model::check_weights()
{
  const std::map<std::string, at::Tensor> weights = named_weights(module_);
  for (const auto &w : weights) {
    const at::Tensor &t = w.second;
    if ((t.is_floating_point() || t.is_complex()) && t.numel() > 0 &&
        !torch::isfinite(t.detach()).all().item<bool>())
      throw ModelFileError(in_quotes(path_) + " is damaged: its weight " + w.first +
                           " holds NaN or infinite values; " + REEXPORT);
  }
  if (!module_.hasattr("metadata_json") || !module_.attr("metadata_json").isString()) return;
  const std::string &json = module_.attr("metadata_json").toStringRef();
  const size_t at = json_value_at(json, {"weights_digest"});
  if (at == std::string::npos) return;    // exported before the digest existed: not checked
  std::string recorded;
  if (json[at] != '"' || !json_string_at(json, {"weights_digest"}, recorded) ||
      recorded.find(':') == std::string::npos)
    throw ModelFileError(in_quotes(path_) + " has an invalid weights_digest in its metadata; " +
                         REEXPORT);
  if (recorded.compare(0, 5, "sha1:") != 0) {
    warnings_.push_back(in_quotes(path_) + ": its weights digest is of an algorithm this build "
                        "does not compute; the weights are not checked");
    return;
  }
  std::string unsupported;
  const std::string digest = weights_digest(weights, unsupported);
  if (digest.empty()) {
    warnings_.push_back(in_quotes(path_) + ": the weight " + unsupported +
                        " has a dtype the weights digest does not cover; not checked");
    return;
  }
  if (digest != recorded)
    throw ModelFileError(in_quotes(path_) + ": its weights do not match the digest recorded at "
                         "export (damaged or edited file): " + REEXPORT);
}

void Model::require(const std::vector<std::string> &entries, const std::string &who) const
{
  std::string missing;
  for (const std::string &entry : entries)
    if (!offers(entry)) missing += (missing.empty() ? "" : ", ") + entry;
  if (missing.empty()) return;
  throw ModelFileError(in_quotes(path_) + " does not provide " + missing + " (needed by " + who +
                       "; the file has model format " + std::to_string(format_version_) +
                       "); re-export it with this transip-md: python -m transip_md.export "
                       "<checkpoint> " + basename_of(path_));
}

torch::jit::Method Model::method(const std::string &entry)
{
  require({entry}, "the caller");
  return module_.get_method(method_names_.at(entry));
}

const std::string &Model::method_name(const std::string &entry) const
{
  require({entry}, "the caller");
  return method_names_.at(entry);
}

double Model::limit(const std::string &name, double fallback) const
{
  const auto it = limits_.find(name);
  return it == limits_.end() ? fallback : it->second;
}

std::vector<std::string> Model::elements() const
{
  std::vector<std::pair<int64_t, std::string>> by_z;
  for (const auto &s : species_) by_z.emplace_back(s.second, s.first);
  std::sort(by_z.begin(), by_z.end());
  std::vector<std::string> out;
  for (const auto &p : by_z) out.push_back(p.second);
  return out;
}

double Model::unit_factor(const std::string &name) const
{
  const auto it = unit_factors_.find(name);
  return it == unit_factors_.end() ? 0.0 : it->second;
}

std::string Model::unit_factor_source(const std::string &name) const
{
  const auto it = unit_sources_.find(name);
  return it == unit_sources_.end() ? std::string() : it->second;
}

ModelMessage Model::refusal(const std::string &entry, std::vector<c10::IValue> args)
{
  if (!offers(entry)) return {};
  const auto found = module_.find_method(method_names_.at(entry));
  if (!found || found->function().getSchema().arguments().size() != args.size() + 1) return {};
  try {
    (*found)(std::move(args));
  } catch (const std::exception &e) {
    ModelMessage why = translate_model_error(e);
    why.text = without_value_error(why.text);
    return why;
  }
  return {};
}

std::string Model::describe() const
{
  std::string caps, lims, units;
  for (const auto &c : capabilities_)
    caps += (caps.empty() ? "" : " ") + c.first + "=" + std::to_string(c.second);
  for (const auto &l : limits_)
    lims += (lims.empty() ? "" : " ") + l.first + "=" + number_text(l.second);
  for (const auto &u : unit_factors_)
    units += (units.empty() ? "" : " ") + u.first + "=" + number_text(u.second);
  std::string species;
  for (const auto &s : elements()) species += (species.empty() ? "" : " ") + s;
  std::string aliases;
  for (const auto &n : method_names_)
    if (n.first != n.second)
      aliases += (aliases.empty() ? "" : ", ") + n.first + " = " + n.second + "()";
  return "declaration: " +
      (declared_ ? std::string("format_version ") + std::to_string(format_version_) +
                       " (declared by the file)"
                 : std::string("format_version ") + std::to_string(format_version_) +
                       " (no declaration: probed" +
                       (aliases.empty() ? std::string() : "; " + aliases) + ")") +
      "\ncapabilities: " + caps + "\nspecies: " + species + "\nlimits: " + lims +
      "\nunit_factors: " + (units.empty() ? std::string("none") : units) +
      "\noperator_library: " +
      (operator_library_.empty() ? std::string("none") : operator_library_) +
      "\ntorch_version: " + (torch_version_.empty() ? std::string("unknown") : torch_version_) +
      " (this build: libtorch " + TORCH_VERSION + ")";
}

}    // namespace transip
