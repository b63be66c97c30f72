/* ----------------------------------------------------------------------
   pair_style transip, ghosts map with edges device: the model's edges are
   selected on the model's device instead of by the host loop of build_rows().

   Why: at 24,576 atoms on an H200 the host loop over LAMMPS' full list
   (~200 pairs per atom within cutoff + skin, each tested against the model
   cutoff) and the upload of its edges took 46 of a step's 91.5 ms, more than
   the model's GPU work.

   What moves, and when:
     at each neighbour-list build (neighbor->ncalls changes)
       rows (owned atoms of mapped types, LAMMPS order), their atomic numbers,
       and every candidate pair of LAMMPS' list between mapped atoms: centre
       row, the row of the neighbour's owner (a ghost is mapped to the owned
       atom it images), and the neighbour's LAMMPS index. No distances yet:
       the list holds pairs within cutoff + skin.
     every step
       atom->x (owned and ghost atoms, float64) in one copy; on the device the
       pairs closer than the model cutoff are kept, in list order, with their
       image shifts x[neighbour] - x[owner].

   The result is the host builder's, value for value: the same float64
   differences, the same test r^2 < cutoff^2 (summed in the same order), the
   same edge order, converted to the model's dtype the same way. The tests
   compare the two (tests/test_lammps.py, edges host vs device).
------------------------------------------------------------------------- */

#include "pair_transip.h"

#include "atom.h"
#include "error.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "utils.h"

#include <algorithm>
#include <cstdint>
#include <vector>

using namespace LAMMPS_NS;

// Each step: the candidates again if LAMMPS rebuilt its list (or atoms came or went).
void PairTransIP::prepare_device_edges()
{
  if (cand_ncalls == neighbor->ncalls && cand_nlocal == atom->nlocal &&
      cand_nghost == atom->nghost)
    return;
  build_candidates();
  cand_ncalls = neighbor->ncalls;
  cand_nlocal = atom->nlocal;
  cand_nghost = atom->nghost;
}

void PairTransIP::build_candidates()
{
  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  const int *type = atom->type;
  index_owned_tags();

  atom_to_row.assign(nall, -1);
  row_to_atom.clear();
  z_buf.clear();
  for (int i = 0; i < nlocal; ++i)
    if (type_to_z[type[i]] > 0) {
      atom_to_row[i] = static_cast<int>(row_to_atom.size());
      row_to_atom.push_back(i);
      z_buf.push_back(type_to_z[type[i]]);
    }
  nlocal_rows = static_cast<int64_t>(row_to_atom.size());

  std::vector<int32_t> ri, rj, jatom;
  for (int ii = 0; ii < list->inum; ++ii) {
    const int i = list->ilist[ii];
    const int row_i = atom_to_row[i];
    if (row_i < 0) continue;
    const int *jlist = list->firstneigh[i];
    for (int jj = 0; jj < list->numneigh[i]; ++jj) {
      const int j = jlist[jj] & NEIGHMASK;
      if (type_to_z[type[j]] <= 0) continue;
      const int row_j = atom_to_row[owner_of(j)];
      if (row_j < 0) continue;
      ri.push_back(row_i);
      rj.push_back(row_j);
      jatom.push_back(j);
    }
  }
  ncandidates = static_cast<int64_t>(ri.size());

  // pageable, blocking copies: once per list build, and the host vectors die here
  const auto i32 = torch::TensorOptions().dtype(torch::kInt32);
  const auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  auto to_device = [&](std::vector<int32_t> &v) {
    if (v.empty()) return torch::empty({0}, i32.device(device));
    return torch::from_blob(v.data(), {ncandidates}, i32).to(device).clone();
  };
  cand_ri = to_device(ri);
  cand_rj = to_device(rj);
  cand_j = to_device(jatom);
  std::vector<int64_t> rows64(row_to_atom.begin(), row_to_atom.end());
  row_atom_dev = torch::tensor(rows64, i64).to(device);
  numbers_dev = torch::tensor(z_buf, i64).to(device);
  charge_dev = torch::scalar_tensor(total_charge, i64).to(device);
  spin_dev = torch::scalar_tensor(multiplicity, i64).to(device);
}

// The model's inputs for this step: positions of the rows and the edges within the cutoff,
// selected on the device from the candidates (one host synchronisation: the edge count).
PairTransIP::ModelInputs PairTransIP::device_edge_inputs()
{
  const int64_t nall = atom->nlocal + atom->nghost;
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  torch::Tensor x_all = torch::from_blob(atom->x[0], {nall, 3}, f64);
  if (device.is_cuda()) {
    torch::Tensor staged = host_rows(stage_x, nall, 3, torch::kFloat64);
    staged.copy_(x_all);
    x_all = staged.to(device, /*non_blocking=*/true);
  }
  const torch::Tensor pos64 = x_all.index_select(0, row_atom_dev);
  const torch::Tensor xi = pos64.index_select(0, cand_ri);
  const torch::Tensor xj = x_all.index_select(0, cand_j);
  const torch::Tensor d = xj - xi;
  const torch::Tensor dx = d.select(1, 0), dy = d.select(1, 1), dz = d.select(1, 2);
  const torch::Tensor r2 = dx * dx + dy * dy + dz * dz;    // as build_rows() sums it
  const torch::Tensor keep = (r2 < model_cutoff * model_cutoff).nonzero().squeeze(1);

  ModelInputs in;
  in.edge_i = cand_ri.index_select(0, keep).to(torch::kInt64);
  in.edge_j = cand_rj.index_select(0, keep).to(torch::kInt64);
  in.shift = (xj.index_select(0, keep) - pos64.index_select(0, in.edge_j)).to(model_dtype);
  in.pos = pos64.to(model_dtype);
  in.numbers = numbers_dev;
  in.charge = charge_dev;
  in.spin = spin_dev;
  if (report_load) {
    report_model_load(in.edge_i.size(0));
    utils::logmesg(lmp,
                   "TransIP: edges device: {} candidate pairs (cutoff + skin) uploaded per "
                   "neighbour-list build; the model's edges are selected on {}\n",
                   ncandidates, device.str());
  }
  return in;
}
