/* ----------------------------------------------------------------------
   pair_style transip: the model's input rows and edges, and its results
   back into LAMMPS. One builder serves every ghost mode:

     rows   owned atoms of mapped types first (LAMMPS order), then
            shell  every mapped ghost (LAMMPS order; with pruning only those
                   within num_layers neighbour hops of owned atoms)
            halo   the ghosts that are neighbours of owned atoms (order of
                   first sight)
            map    none: a ghost is mapped to the owned atom it images
     edges  directed pairs (centre row, neighbour row) within the model
            cutoff, centres: owned atoms (map, halo) or every atom with a
            neighbour row (shell); map adds the image offset of each edge
            (x[ghost] - x[owner]) as its shift.

   One scatter (add_model_results) puts forces of every row onto its LAMMPS
   atom (ghost rows included: reverse communication sums them into their
   owners), the energies of the owned rows into eng_vdwl/eatom, and the
   virial: the model's (map) or sum x (x) f when LAMMPS asks for it without
   fdotr.
------------------------------------------------------------------------- */

#include "pair_transip.h"

#include "atom.h"
#include "comm.h"
#include "error.h"
#include "neigh_list.h"
#include "utils.h"

#include <algorithm>
#include <climits>
#include <mpi.h>

using namespace LAMMPS_NS;

// Shell mode with pruning: hops[i] = graph distance (edges shorter than the cutoff) of atom i
// from the owned atoms, up to num_layers (INT_MAX beyond). The energy of an owned atom after L
// layers depends on atoms at most L edges away, and only atoms at most L-1 edges away need
// neighbours of their own; a breadth-first search over the neighbour list finds them, so the
// rest of the ghost shell (kept for the skin) costs nothing in the model. Exact.
void PairTransIP::mark_reachable()
{
  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  double **x = atom->x;
  const int *type = atom->type;
  const double cutsq_model = model_cutoff * model_cutoff;
  const int *ilist = list->ilist;
  const int *numneigh = list->numneigh;
  int **firstneigh = list->firstneigh;

  centre_in_list.assign(nall, 0);
  for (int ii = 0; ii < list->inum + list->gnum; ++ii) centre_in_list[ilist[ii]] = 1;
  hops.assign(nall, INT_MAX);
  frontier.clear();
  for (int i = 0; i < nlocal; ++i)
    if (type_to_z[type[i]] > 0) {
      hops[i] = 0;
      frontier.push_back(i);
    }
  for (int level = 0; level < num_layers && !frontier.empty(); ++level) {
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

// map mode: atom ID -> owned atom (tag_to_local), for mapping periodic images to their owners.
void PairTransIP::index_owned_tags()
{
  const int nlocal = atom->nlocal;
  const tagint *tag = atom->tag;
  max_owned_tag = 0;
  for (int i = 0; i < nlocal; ++i) max_owned_tag = std::max(max_owned_tag, tag[i]);
  tag_to_local.assign(static_cast<size_t>(max_owned_tag) + 1, -1);
  for (int i = 0; i < nlocal; ++i) tag_to_local[tag[i]] = i;
}

// The owned atom that atom j (owned or ghost) images; after index_owned_tags().
int PairTransIP::owner_of(int j) const
{
  if (j < atom->nlocal) return j;
  const tagint t = atom->tag[j];
  const int owner = t <= max_owned_tag ? tag_to_local[t] : -1;
  if (owner < 0)
    error->one(FLERR, "pair_style transip: ghost atom ID {} has no owned atom on this rank",
               static_cast<bigint>(t));
  return owner;
}

void PairTransIP::build_rows()
{
  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  double **x = atom->x;
  const int *type = atom->type;
  const double cutsq_model = model_cutoff * model_cutoff;
  const bool shell = ghost_mode == GHOSTS_SHELL;
  const bool map = ghost_mode == GHOSTS_MAP;
  const bool halo = ghost_mode == GHOSTS_HALO;
  const bool pruning = shell && prune && can_prune();
  const int64_t nlayers = num_layers;

  if (pruning) mark_reachable();
  if (map) index_owned_tags();

  atom_to_row.assign(nall, -1);
  row_to_atom.clear();
  pos_buf.clear();
  z_buf.clear();
  auto add_row = [&](int i) {
    atom_to_row[i] = static_cast<int>(row_to_atom.size());
    row_to_atom.push_back(i);
    pos_buf.push_back(x[i][0]);
    pos_buf.push_back(x[i][1]);
    pos_buf.push_back(x[i][2]);
    z_buf.push_back(type_to_z[type[i]]);
    return atom_to_row[i];
  };
  auto wanted = [&](int i) {
    return type_to_z[type[i]] > 0 && !(pruning && hops[i] > nlayers);
  };
  for (int i = 0; i < nlocal; ++i)
    if (wanted(i)) add_row(i);
  nlocal_rows = static_cast<int64_t>(row_to_atom.size());
  if (shell)
    for (int i = nlocal; i < nall; ++i)
      if (wanted(i)) add_row(i);

  edge_i_buf.clear();
  edge_j_buf.clear();
  shift_buf.clear();
  const int ncentres = shell ? list->inum + list->gnum : list->inum;
  for (int ii = 0; ii < ncentres; ++ii) {
    const int i = list->ilist[ii];
    const int ri = atom_to_row[i];
    if (ri < 0) continue;
    if (pruning && hops[i] >= nlayers) continue;    // its neighbours cannot reach owned atoms
    const int *jlist = list->firstneigh[i];
    for (int jj = 0; jj < list->numneigh[i]; ++jj) {
      const int j = jlist[jj] & NEIGHMASK;
      if (type_to_z[type[j]] <= 0) continue;
      const double dx = x[j][0] - x[i][0];
      const double dy = x[j][1] - x[i][1];
      const double dz = x[j][2] - x[i][2];
      if (dx * dx + dy * dy + dz * dz >= cutsq_model) continue;
      int rj;
      if (map) {
        const int owner = owner_of(j);
        rj = atom_to_row[owner];
        if (rj < 0) continue;
        shift_buf.push_back(x[j][0] - x[owner][0]);
        shift_buf.push_back(x[j][1] - x[owner][1]);
        shift_buf.push_back(x[j][2] - x[owner][2]);
      } else {
        rj = atom_to_row[j];
        if (rj < 0) {
          if (!halo) continue;    // shell: pruned away
          rj = add_row(j);
        }
      }
      edge_i_buf.push_back(ri);
      edge_j_buf.push_back(rj);
    }
  }
  if (report_load) report_model_load(static_cast<int64_t>(edge_i_buf.size()));
}

// Logs (once after init, on rank 0) how many atoms and edges the model gets per rank: the
// number to watch for the cost of ghost atoms. Collective: every rank must call it.
void PairTransIP::report_model_load(int64_t nedges)
{
  report_load = false;
  const int64_t nrows = static_cast<int64_t>(row_to_atom.size());
  if (ghost_mode == GHOSTS_MAP) {    // one rank
    utils::logmesg(lmp, "TransIP: model input: {} owned atoms (ghosts mapped), {} edges\n",
                   nrows, nedges);
    return;
  }
  const char *note = ghost_mode == GHOSTS_HALO
      ? "; halo exchange: layers run on owned atoms only"
      : (prune && can_prune()) ? ", the rest cannot reach owned atoms" : "";
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

// The per-step model inputs from the row buffers (positions, atomic numbers, edges; the
// shifts in map mode) plus charge and multiplicity, on the model's device; positions and
// shifts in the model's dtype. On the CPU the tensors alias the buffers (no copy).
//
// CUDA: the buffers are written into two pinned host blocks kept between steps (host_rows,
// grown by an eighth when too small): int64 edge_i, edge_j, numbers, charge, multiplicity;
// and, in the model's dtype, positions and shifts (converted by the same CPU copy kernel that
// the blocking .to(device, dtype) ran on the host). Each block goes to the device in one copy
// that does not block the host (7 pageable copies per step before). The model's inputs are
// views of the two device blocks, with the dtypes, shapes and values of before.
// Rewriting the blocks at the next step is safe: this step's copy of the results to the host
// waits for everything queued before it on the stream, the uploads included.
PairTransIP::ModelInputs PairTransIP::model_inputs()
{
  if (device_edges) return device_edge_inputs();    // pair_transip_device_edges.cpp
  const int64_t nrows = static_cast<int64_t>(row_to_atom.size());
  const int64_t nedges = static_cast<int64_t>(edge_i_buf.size());
  const int64_t nshift = ghost_mode == GHOSTS_MAP ? nedges : 0;
  const auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
  const auto i64 = torch::TensorOptions().dtype(torch::kInt64);
  ModelInputs in;
  if (!device.is_cuda()) {
    in.pos = torch::from_blob(pos_buf.data(), {nrows, 3}, f64);
    in.numbers = torch::from_blob(z_buf.data(), {nrows}, i64);
    in.edge_i = torch::from_blob(edge_i_buf.data(), {nedges}, i64);
    in.edge_j = torch::from_blob(edge_j_buf.data(), {nedges}, i64);
    if (ghost_mode == GHOSTS_MAP)
      in.shift = torch::from_blob(shift_buf.data(), {nshift, 3}, f64);
    in.charge = torch::scalar_tensor(total_charge, i64);
    in.spin = torch::scalar_tensor(multiplicity, i64);
    return in;
  }

  // the blocks on the host: int64 [2E + rows + 2], model dtype [3 rows + 3 shifts]
  const int64_t nint = 2 * nedges + nrows + 2, nreal = 3 * (nrows + nshift);
  const torch::Tensor ints = host_rows(stage_int, nint, 1, torch::kInt64).view({nint});
  const torch::Tensor reals = host_rows(stage_real, nreal, 1, model_dtype).view({nreal});
  auto put = [](const torch::Tensor &block, int64_t at, void *data, int64_t n,
                const torch::TensorOptions &kind) {
    if (n > 0) block.narrow(0, at, n).copy_(torch::from_blob(data, {n}, kind));
  };
  put(ints, 0, edge_i_buf.data(), nedges, i64);
  put(ints, nedges, edge_j_buf.data(), nedges, i64);
  put(ints, 2 * nedges, z_buf.data(), nrows, i64);
  ints[nint - 2].fill_(total_charge);
  ints[nint - 1].fill_(multiplicity);
  put(reals, 0, pos_buf.data(), 3 * nrows, f64);
  put(reals, 3 * nrows, shift_buf.data(), 3 * nshift, f64);

  const torch::Tensor ints_d = ints.to(device, /*non_blocking=*/true);
  const torch::Tensor reals_d = reals.to(device, /*non_blocking=*/true);
  in.edge_i = ints_d.narrow(0, 0, nedges);
  in.edge_j = ints_d.narrow(0, nedges, nedges);
  in.numbers = ints_d.narrow(0, 2 * nedges, nrows);
  in.charge = ints_d[nint - 2];
  in.spin = ints_d[nint - 1];
  in.pos = reals_d.narrow(0, 0, 3 * nrows).view({nrows, 3});
  if (ghost_mode == GHOSTS_MAP)
    in.shift = reals_d.narrow(0, 3 * nrows, 3 * nshift).view({nshift, 3});
  return in;
}

// fr: forces [rows, 3] (eV/Å), er: energies of the owned rows (eV), model_virial: the
// model's virial [6] (eV, LAMMPS order; map mode) or nullptr. The model's eV become the
// LAMMPS energy unit here (energy_unit; 1 in units metal), so atom->f holds LAMMPS units and
// virial_fdotr_compute() needs no conversion.
void PairTransIP::add_model_results(const double *fr, const double *er, const double *model_virial)
{
  const double u = energy_unit;
  const int64_t nrows = static_cast<int64_t>(row_to_atom.size());
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
  if (!vflag_global) return;
  if (model_virial) {
    for (int k = 0; k < 6; ++k) virial[k] += u * model_virial[k];
  } else if (!vflag_fdotr) {    // some hybrid setups ask for the pair virial without fdotr
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
