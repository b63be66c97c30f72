/* ----------------------------------------------------------------------
   pair_style transip: the per-step report of where compute() spends its time
   (the phases of pair_transip_timing.h), printed by LAMMPS' Finish at the end
   of every run with at least one step, before its MPI task timing table:

     TransIP per step (ms, max over 2 ranks, 300 steps): rows 3.100 | to device 4.200 |
       model 40.000 | to host 2.000 | scatter 0.400 | total 49.700

   (one line). Each phase is its time per step on the slowest rank for that
   phase; total is the slowest rank's sum of its phases (at most LAMMPS' Pair
   time per step, which also holds the virial of LAMMPS' fdotr and the call).
------------------------------------------------------------------------- */

#include "pair_transip.h"

#include "comm.h"
#include "utils.h"

#include <mpi.h>

using namespace LAMMPS_NS;
using transip::PhaseTimes;

// Collective (Finish::end calls it on every rank).
void PairTransIP::finish()
{
  double mine[PhaseTimes::NPHASES + 1], most[PhaseTimes::NPHASES + 1];
  double sum = 0.0;
  for (int k = 0; k < PhaseTimes::NPHASES; ++k) sum += mine[k] = phase_times.seconds[k];
  mine[PhaseTimes::NPHASES] = sum;
  MPI_Reduce(mine, most, PhaseTimes::NPHASES + 1, MPI_DOUBLE, MPI_MAX, 0, world);
  // every rank counts the same steps: compute() runs on all of them
  const long long steps = phase_times.steps;
  if (comm->me != 0 || steps == 0) return;

  const bool halo = ghost_mode == GHOSTS_HALO;    // halo: model, exchange and results in one
  const double ms = 1e3 / static_cast<double>(steps);
  std::string line = fmt::format("TransIP per step (ms, max over {} rank{}, {} steps): ",
                                 comm->nprocs, comm->nprocs == 1 ? "" : "s", steps);
  for (int k = 0; k < PhaseTimes::NPHASES; ++k) {
    const bool shown = halo ? (k != PhaseTimes::MODEL && k != PhaseTimes::TO_HOST)
                            : k != PhaseTimes::HALO;
    if (shown) line += fmt::format("{} {:.3f} | ", PhaseTimes::NAMES[k], most[k] * ms);
  }
  line += fmt::format("total {:.3f}\n", most[PhaseTimes::NPHASES] * ms);
  if (device.is_cuda())
    line += halo ? "TransIP: the device's time is inside 'halo' (queued kernels finish at the "
                   "host copies of the exchange and the results)\n"
                 : "TransIP: the model call returns before the GPU has finished; the device's "
                   "time is in 'model' + 'to host' (the copy of the results waits for it)\n";
  utils::logmesg(lmp, "\n" + line);
}
